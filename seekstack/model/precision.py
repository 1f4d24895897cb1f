"""Buffers that stay float32 whatever dtype the model is cast to (`model.to(torch.bfloat16)`, `load_pretrained`'s
dtype): values a low-precision copy would spoil, such as RoPE's inverse frequencies and the routers' bias."""

from __future__ import annotations

import torch
from torch import nn


class Float32Buffers(nn.Module):
    """A module whose buffers named in `float32_buffers` move with the model but are never cast: they keep float32."""

    float32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        kept = {name: self._buffers[name] for name in self.float32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = self._buffers[name]
            # From the meta device (`to_empty`) there are no values to keep, only the dtype.
            float32 = torch.empty_like(moved, dtype=torch.float32) if before.is_meta else before.to(moved.device)
            self._buffers[name] = float32
        return self
