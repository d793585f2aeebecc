"""The model: loading the Qwen-Image-Edit pipelines (``loading``), device and dtype (``device``), what identifies
the weights (``fingerprint``), quantization of the frozen base (``quantize``), LoRA adapters and their export
(``lora``), the transformer's token layout (``latents``), the flow-matching objective (``flow``), scheduled
sampling's rollout of the training input (``rollout``), the transformer from a community GGUF or ComfyUI file
(``single_file``, its frozen Linears ``frozen_linear``), the tiny random-weight model of the real classes
(``tiny_model``) and community files written from it (``tiny_files``).

The objective lives here rather than in ``train``: previews (``shared.evaluate``) score the held-out loss with it,
and the trainer uses ``shared.evaluate`` for in-process validation, so neither of the two may own it.

May import: ``shared.config``, ``shared.errors``.
"""
