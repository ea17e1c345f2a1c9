"""Data in: Parquet inputs and their fingerprints, columns, the feature spec and encoding, training
batches.

vaewatch.model.data was one module before 0.2.0; its names still resolve here, with a
DeprecationWarning, until 0.3.0 (they live in vaewatch.model.data.inputs now)."""

from vaewatch.model._moved import forward_package

__getattr__ = forward_package(__name__, "vaewatch.model.data.inputs")
