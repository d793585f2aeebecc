"""Training: batches from the cache (``loader``), the LoRA trainer and its loop (``trainer``), the optimizers by
SimpleTuner's names (``optimizers``), the learning-rate schedules (``schedule``), the EMA (``ema``), the GPU
settings and memory figures (``gpu``), the trackers ``report_to`` names (``trackers``: TensorBoard, offline
W&B), and one run end to end in this process (``runner``: encode, train, validate, export).

May import: ``shared.encode``, ``shared.evaluate``, ``shared.plan`` and the packages below them.
"""
