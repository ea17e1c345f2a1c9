"""Moved to vaewatch.model.estimation.proposal in 0.2.0; this path goes in 0.3.0."""

from vaewatch.model._moved import forward_module

__getattr__ = forward_module(__name__, "vaewatch.model.estimation.proposal")
