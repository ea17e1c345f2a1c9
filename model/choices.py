"""The sets of choices vaewatch's settings take, one string enum each.

The command line's `click.Choice` lists, the validation of configs and saved models, and their
error messages are all built from these, so a choice is added in one place. Members are strings
(`FlagRule.ANY == "any"`): configs and saved models keep plain strings, and an older model's
value reads as before.
"""

from __future__ import annotations

import enum

from vaewatch.model.errors import UserError


class Choice(str, enum.Enum):
    """A set of choices for one setting."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def check(cls, field: str, value: object) -> str:
        """`value` as a plain string when it is one of the choices; else a UserError (a
        ValueError) naming the field, the value and the choices."""
        try:
            return cls(value).value
        except ValueError:
            raise UserError(
                f"{field} must be one of {', '.join(cls.values())}, got {value!r}"
            ) from None


class FlagRule(Choice):
    """How is_anomaly is decided (model/calibration/scores.py)."""

    ANY = "any"  # the total score, or one feature, or the discrete part, in its tail
    TOTAL = "total"  # the total score above the threshold


class Objective(Choice):
    """The training objective (model/training/loop.py)."""

    ELBO = "elbo"
    IWAE = "iwae"


class Missingness(Choice):
    """How a missing value is scored (model/network/vae.py)."""

    MODEL = "model"  # its indicator is modelled by the decoder
    MARGINAL = "marginal"  # marginalised out


class Precision(Choice):
    """The scoring matmuls' precision (model/device.py)."""

    AUTO = "auto"  # bf16 where the device runs it natively, else fp32
    FP32 = "fp32"
    BF16 = "bf16"


class TrainingProfile(Choice):
    """The robust-training profile (model/training/sizing.py)."""

    AUTO = "auto"  # by the table's size
    SMALL = "small"
    LARGE = "large"


class Points(Choice):
    """The design of the K shared latent points (model/estimation/noise.py)."""

    SPHERICAL = "spherical"
    SOBOL = "sobol"
