"""Evaluation: our own edit sampler over a pipeline's parts (``sampling``) and the validation previews, PSNRs and
held-out loss of a run's LoRA (``preview``).

May import: ``shared.encode`` and the packages below it.
"""
