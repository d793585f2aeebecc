"""trainer_svc: quantized LoRA training runs as jobs; the training worker lives here."""
