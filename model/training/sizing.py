"""What a table's size decides: the network's capacity and how robust its training is.

Both follow the number of training rows, never the data's labels, so one default configuration
serves every table: `capacity(rows)` narrows the network up to 724 training rows, and the same
boundary (a network narrower than the default widths) selects the small-table training profile
(`training_profile`), in which a handful of anomalous rows would otherwise be memorised.
"""

from __future__ import annotations

import math

from vaewatch.model import defaults
from vaewatch.model.choices import TrainingProfile


def capacity(rows: int) -> tuple[int, tuple[int, ...]]:
    """(latent dimensions, hidden widths) for `rows` training rows: the defaults (8, 128x128)
    from 725 rows up, smaller below, so a small table cannot be memorised, anomalies
    included. Hidden width: a power of two near rows / ROWS_PER_HIDDEN_UNIT, at least
    MIN_HIDDEN; latent: one dimension per ROWS_PER_LATENT rows, at least 2."""
    cap_latent, cap_hidden = defaults.LATENT_DIM, defaults.HIDDEN
    width = 2 ** round(math.log2(max(1, rows) / defaults.ROWS_PER_HIDDEN_UNIT))
    width = max(defaults.MIN_HIDDEN, width)
    hidden = tuple(min(w, width) for w in cap_hidden)
    latent = max(2, min(cap_latent, rows // defaults.ROWS_PER_LATENT))
    return latent, hidden


def is_small_table(rows: int) -> bool:
    """True where `capacity` narrows the network (up to SMALL_TABLE_MAX_ROWS training rows)."""
    return capacity(rows)[1] != tuple(defaults.HIDDEN)


# the largest small table: the width rounds below the default from rows / ROWS_PER_HIDDEN_UNIT
# under 2 ** (log2(widest) - 0.5), so 724 training rows at the defaults (8 x 2 ** 6.5 = 724.1)
SMALL_TABLE_MAX_ROWS = math.floor(
    defaults.ROWS_PER_HIDDEN_UNIT * 2 ** (math.log2(max(defaults.HIDDEN)) - 0.5)
)
PROFILES = TrainingProfile.values()


def profile_name(rows: int, profile: str = "auto") -> str:
    """ "small" or "large": the profile `profile` names, or by the size where it is "auto"."""
    if profile != "auto":
        return profile
    return "small" if is_small_table(rows) else "large"


def training_profile(rows: int, profile: str = "auto") -> dict:
    """The robust-training settings (TrainConfig field -> value) for `rows` training rows:
    `defaults.SMALL_TABLE_TRAINING` on a small table, `defaults.LARGE_TABLE_TRAINING` above;
    `profile` "small" or "large" forces one whatever the size."""
    small = profile_name(rows, profile) == "small"
    return dict(defaults.SMALL_TABLE_TRAINING if small else defaults.LARGE_TABLE_TRAINING)
