"""``edittuner doctor``: what a user runs first on a new GPU host, before a 58 GB download and an hours-long run.

Each check is a row (pass, fail, warn, or skip with why) with what to do when it is not a pass: the host and its
device (``host``), the libraries each precision needs and the process group the trainer creates (``host``), one
real-width transformer block per precision quantized against bf16 with a LoRA backward (``block``), a tiny
end-to-end run through the project's own training code (``tiny_run``) and, with ``--full``, one real-size step per
precision beside the planner's prediction (``full``). Part of the CLI: it may import every layer of ``shared``.
"""
