"""Training: batches from the cache (``loader``), the LoRA trainer and its loop (``trainer``), and one run end to
end in this process (``runner``: encode, train, validate, export).

May import: ``shared.encode``, ``shared.evaluate``, ``shared.plan`` and the packages below them.
"""
