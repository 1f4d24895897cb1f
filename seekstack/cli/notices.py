"""Log notices of other libraries that speak to their developers, not to a seekstack user, kept off the terminal.

Importing peft imports transformers, which imports torchao when it is installed. On a CPU build of torch, torchao
then warns that its CUDA kernels (`_C_mxfp8...so`, `_C_cutlass_90a...so`, built against libtorch_cuda) fail to load,
and torch warns that torchao registers Enums as pytree constants, a deprecation aimed at torchao. Neither tells the
user of `lora train`, `generate --adapter` or `serve --adapter` anything to do (seekstack uses torchao for float8
training only, which needs a GPU). A failed load on a CUDA build of torch, and every other notice of both libraries,
still shows.

lm_eval tells of each task whose documents a callable makes (`custom_dataset`: seekstack's local tasks, and only
those) that "custom kwargs can be passed to `--metadata` in console", its own CLI's option: `seekstack eval` has
none, and seekstack makes those documents itself.

seekstack's own warnings print as the commands' other warnings do, `warning: MESSAGE`, not in Python's format for a
developer (`/.../seekstack/compress/quantize.py:383: UserWarning: MESSAGE` and the line of code that warned); other
libraries' keep Python's, which names the library.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

TORCHAO_KERNEL_LOAD = re.compile(r"Failed to load \S*torchao\S*_C\w*\S*\.so\b")
PYTREE_ENUM_DEPRECATION = "is an Enum subclass and is now natively supported by torch.compile"
LM_EVAL_METADATA_HINT = "Custom kwargs can be passed to `--metadata` in console"
PACKAGE = Path(__file__).resolve().parents[1]  # seekstack/
PYTHON_WARNING_FORMAT = warnings.formatwarning


def quiet_third_party_notices() -> None:
    """Drop torchao's failed loads of its CUDA kernels on a CPU build of torch, torch's deprecation of the pytree
    registration torchao makes and lm_eval's hint at its own CLI's --metadata from the logs of this process."""
    logging.getLogger("torchao").addFilter(_not_a_cuda_kernel_on_a_cpu_build)
    logging.getLogger("torch.utils._pytree").addFilter(_not_the_enum_deprecation)
    logging.getLogger("lm_eval.api.task").addFilter(_not_the_metadata_hint)


def _not_a_cuda_kernel_on_a_cpu_build(record: logging.LogRecord) -> bool:
    import torch  # imported already: torchao logs only once it has imported torch

    return torch.version.cuda is not None or not TORCHAO_KERNEL_LOAD.match(record.getMessage())


def _not_the_enum_deprecation(record: logging.LogRecord) -> bool:
    return PYTREE_ENUM_DEPRECATION not in record.getMessage()


def _not_the_metadata_hint(record: logging.LogRecord) -> bool:
    return LM_EVAL_METADATA_HINT not in record.getMessage()


def one_line_warnings() -> None:
    """Print seekstack's own warnings as `warning: MESSAGE`, as the commands print theirs; other libraries' as Python
    does."""
    warnings.formatwarning = _one_line_if_ours


def _one_line_if_ours(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    if Path(filename).resolve().is_relative_to(PACKAGE):
        return f"warning: {message}\n"
    return PYTHON_WARNING_FORMAT(message, category, filename, lineno, line)
