"""Calibration: where a score sits among held-out normal scores, and a day's drift against them.

vaewatch.model.calibration was one module before 0.2.0; its names still resolve here, with a
DeprecationWarning, until 0.3.0 (they live in vaewatch.model.calibration.scores now)."""

from vaewatch.model._moved import forward_package

__getattr__ = forward_package(__name__, "vaewatch.model.calibration.scores")
