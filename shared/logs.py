"""Logging set-up shared by the command line, the services and the training worker.

Optional libraries announce themselves when another library imports them: transformers and diffusers import
torchao whenever it is installed (it is, for the ``ao-*`` optimizers), and torchao then warns about CUDA kernels
a CPU-only host cannot load and about deprecated torch registrations. Those lines say nothing about the user's
run; they are raised to errors-only here, before anything imports them.

bitsandbytes warns on every call instead: its int8 matmul (``MatMul8bitLt``) says on each ``Linear8bitLt``
forward that it casts a bf16 input to fp16, ~840 lines a forward and ~1.7k a checkpointed step with an int8-bnb
base. Errors-only too: a log of them is a log of nothing else.
"""

from __future__ import annotations

import logging

IMPORT_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
CALL_NOISE = ("bitsandbytes",)


def quiet_import_noise() -> None:
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_call_noise() -> None:
    for name in CALL_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
