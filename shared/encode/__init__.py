"""Encoding: the tensor math (``ops``: VAE latents, caption embeddings conditioned on the references), the cache's
layout, keys and training index (``cache``), and the encoder that fills the store (``encoder``).

May import: ``shared.plan`` (the VAE batch that fits a GPU), ``shared.model``, ``shared.data``, ``shared.store``,
``shared.config``, ``shared.errors``.
"""
