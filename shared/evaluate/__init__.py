"""Evaluation: our own edit sampler over a pipeline's parts (``sampling``), the validation previews, PSNRs and
held-out loss of a run's LoRA (``preview``), and a run's report page of its curves and previews (``report``).

May import: ``shared.encode`` and the packages below it.
"""
