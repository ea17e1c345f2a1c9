"""Which torch device a job runs on: training and scoring pick it the same way."""

from __future__ import annotations

import torch

from vaewatch.model.errors import UserError

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
            "use --device auto or --device cpu"
        )
    return resolved
