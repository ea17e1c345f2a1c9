"""Training: the fit from data to a calibrated artifact, the loop, what a table's size decides.

vaewatch.model.training was one module before 0.2.0; its names still resolve here, with a
DeprecationWarning, until 0.3.0 (they live in vaewatch.model.training.loop now)."""

from vaewatch.model._moved import forward_package

__getattr__ = forward_package(__name__, "vaewatch.model.training.loop")
