"""eval_svc: renders validation previews for a run's LoRA."""
