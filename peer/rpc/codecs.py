"""Wire codecs for float tensors: ``none``, ``fp16``, ``bf16`` and blockwise ``int8``.

``encode`` turns a CPU tensor into a flat uint8 tensor (the payload, zero-copy for
``none`` on a contiguous CPU tensor) and ``decode`` turns a payload back into a tensor
of the original dtype and shape.

* ``fp16``: one float32 scale (the absmax / 2^15), then the float16 values divided by it;
  the scale keeps small gradients out of float16's subnormal range. Relative error ~5e-4.
* ``bf16``: the bfloat16 values (same range as float32). Relative error ~4e-3.
* ``int8``: one float32 absmax scale per block of ``block_size`` values, then the int8
  values (``round(127 * x / absmax)``): about 4x smaller than float32, relative error
  around 1/254 of each block's largest value.

NaN and inf survive every codec, so the receiver's finiteness check still sees them.
Integer tensors (token ids, labels) always travel as ``none``.
"""

from __future__ import annotations

import math

import torch

CODECS = ("none", "fp16", "bf16", "int8")
INT8_BLOCK = 256
FP16_TOP = 2.0**15  # the absmax is scaled to this (float16's max is 65504)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor as a flat uint8 tensor (no copy when it is contiguous on the CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).reshape(-1)


def encoded_size(numel: int, dtype: torch.dtype, codec: str, block_size: int = INT8_BLOCK) -> int:
    """Bytes that ``encode`` produces for a tensor of ``numel`` elements."""
    if codec == "none" or not dtype.is_floating_point:
        return numel * dtype.itemsize
    if codec == "fp16":
        return 4 + numel * 2
    if codec == "bf16":
        return numel * 2
    return math.ceil(numel / block_size) * 4 + numel


def _absmax_scale(x: torch.Tensor, top: float) -> torch.Tensor:
    """absmax / top as a float32 scalar tensor; 1 when the absmax is 0 or not finite."""
    absmax = x.abs().max() if x.numel() else torch.zeros((), dtype=x.dtype)
    scale = (absmax.float() / top).reshape(1)
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def encode(tensor: torch.Tensor, codec: str, block_size: int = INT8_BLOCK) -> torch.Tensor:
    """:returns: the payload, a flat uint8 tensor of ``encoded_size(...)`` bytes"""
    if codec == "none" or not tensor.dtype.is_floating_point:
        return as_bytes(tensor)
    if codec == "bf16":
        return as_bytes(tensor.detach().to(torch.bfloat16))
    if codec == "fp16":
        x = tensor.detach().float().cpu()
        scale = _absmax_scale(x, FP16_TOP)
        return torch.cat([as_bytes(scale), as_bytes((x / scale).to(torch.float16))])
    if codec != "int8":
        raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    flat = tensor.detach().float().reshape(-1).cpu()
    blocks = math.ceil(flat.numel() / block_size)
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - flat.numel())).view(blocks, block_size)
    scale = padded.abs().amax(dim=1) / 127.0  # (blocks,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[: flat.numel()]
    return torch.cat([as_bytes(scale), as_bytes(q)])


def decode(payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], codec: str,
           block_size: int = INT8_BLOCK) -> torch.Tensor:
    """Inverse of :func:`encode`. ``payload`` is a flat uint8 tensor of exactly the encoded size."""
    numel = math.prod(shape)
    expected = encoded_size(numel, dtype, codec, block_size)
    if payload.numel() != expected:
        raise ValueError(f"payload has {payload.numel()} bytes, {codec} {dtype} {list(shape)} needs {expected}")
    if codec == "none" or not dtype.is_floating_point:
        return payload.view(dtype).reshape(shape)
    if codec == "bf16":
        return payload.view(torch.bfloat16).to(dtype).reshape(shape)
    if codec == "fp16":
        scale = payload[:4].view(torch.float32)
        return (payload[4:].view(torch.float16).float() * scale).to(dtype).reshape(shape)
    blocks = math.ceil(numel / block_size)
    scale = payload[: blocks * 4].view(torch.float32)
    q = payload[blocks * 4 :].view(torch.int8).float()
    q = torch.nn.functional.pad(q, (0, blocks * block_size - numel)).view(blocks, block_size)
    return (q * scale[:, None]).reshape(-1)[:numel].to(dtype).reshape(shape)
