"""Logging set-up shared by the command line, the services and the training worker.

Optional libraries announce themselves when another library imports them: transformers and diffusers import
torchao whenever it is installed (it is, for the ``ao-*`` optimizers), and torchao then warns about CUDA kernels
a CPU-only host cannot load and about deprecated torch registrations. Those lines say nothing about the user's
run; they are raised to errors-only here, before anything imports them.
"""

from __future__ import annotations

import logging

IMPORT_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_import_noise() -> None:
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
