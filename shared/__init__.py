"""EditTuner core: configuration, datasets, storage, models, encoding, training, export, previews."""
