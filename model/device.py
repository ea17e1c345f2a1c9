"""Which torch device a job runs on: training and scoring pick it the same way."""

from __future__ import annotations

import logging

import torch

from vaewatch.model.choices import Precision
from vaewatch.model.errors import UserError, setting

AUTO = "auto"  # CUDA when present, else CPU


def resolve_device(device: str = AUTO) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UserError(
            f"device {device!r} is not a torch device ({err}); use auto, cpu or cuda"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {device!r} asked for, but this machine has no CUDA device; "
            f"use {setting('device', 'auto')} or {setting('device', 'cpu')}"
        )
    return resolved


PRECISIONS = Precision.values()


def bf16_is_fast(device: torch.device) -> bool:
    """Whether this device multiplies bfloat16 natively (AVX-512 BF16 or AMX on CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network's matmuls run in under autocast, or None for float32.

    'bf16': the encoder and decoder MLPs in bfloat16, every log-density, the Jacobian and the
    logsumexp still in float32/float64 (model/network/vae.py casts the MLP outputs back). 'auto':
    bf16 where the device has it natively, else float32."""
    Precision.check("precision", precision)
    fast = bf16_is_fast(device)
    if precision == "fp32" or (precision == "auto" and not fast):
        return None
    if not fast:
        logging.getLogger(__name__).warning(
            "precision bf16 asked for on a %s without native bfloat16 (AVX-512 BF16 or AMX on "
            "CPU): bf16 is emulated there and slower than fp32; %s picks fp32 on this machine",
            device.type.upper() if device.type == "cuda" else "CPU",
            setting("precision", "auto"),
        )
    return torch.bfloat16
