"""encoder_svc: serves the encoding core (images -> VAE latents and Qwen2.5-VL embeddings) over gRPC."""
