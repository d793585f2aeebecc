"""Configuration: SimpleTuner-style ``config.json`` and ``multidatabackend.json`` parsed into frozen dataclasses
(``schema``), checked across entries (``checks``), read with overrides and presets (``loading``); JSON with comments
(``jsonc``), the typed builder (``typed``), the model flavours (``flavours``), the optimizer names and their
specs (``optimizers``), what each of SimpleTuner's options does here (``simpletuner``, with its option list in
``simpletuner_options.json``) and the bundled presets (``presets/``).

May import: ``shared.errors``, and ``shared.store.keys`` for the rules a cache prefix must follow.
"""
