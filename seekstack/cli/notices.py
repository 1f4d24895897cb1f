"""Log notices of other libraries that speak to their developers, not to a seekstack user, kept off the terminal.

Importing peft imports transformers, which imports torchao when it is installed. On a CPU build of torch, torchao
then warns that its CUDA kernels (`_C_mxfp8...so`, `_C_cutlass_90a...so`, built against libtorch_cuda) fail to load,
and torch warns that torchao registers Enums as pytree constants, a deprecation aimed at torchao. Neither tells the
user of `lora train`, `generate --adapter` or `serve --adapter` anything to do (seekstack uses torchao for float8
training only, which needs a GPU). A failed load on a CUDA build of torch, and every other notice of both libraries,
still shows.
"""

from __future__ import annotations

import logging
import re

TORCHAO_KERNEL_LOAD = re.compile(r"Failed to load \S*torchao\S*_C\w*\S*\.so\b")
PYTREE_ENUM_DEPRECATION = "is an Enum subclass and is now natively supported by torch.compile"


def quiet_third_party_notices() -> None:
    """Drop torchao's failed loads of its CUDA kernels on a CPU build of torch, and torch's deprecation of the pytree
    registration torchao makes, from the logs of this process."""
    logging.getLogger("torchao").addFilter(_not_a_cuda_kernel_on_a_cpu_build)
    logging.getLogger("torch.utils._pytree").addFilter(_not_the_enum_deprecation)


def _not_a_cuda_kernel_on_a_cpu_build(record: logging.LogRecord) -> bool:
    import torch  # imported already: torchao logs only once it has imported torch

    return torch.version.cuda is not None or not TORCHAO_KERNEL_LOAD.match(record.getMessage())


def _not_the_enum_deprecation(record: logging.LogRecord) -> bool:
    return PYTREE_ENUM_DEPRECATION not in record.getMessage()
