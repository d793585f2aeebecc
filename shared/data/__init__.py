"""Datasets: image sources and safe decoding (``sources``), pairing targets with references, captions and
placements (``pairing``), aspect buckets and crops (``geometry``), and generated paired data for tests and the demo
(``synthetic``).

May import: ``shared.config``, ``shared.store``, ``shared.errors``.
"""
