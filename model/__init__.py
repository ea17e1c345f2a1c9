"""vaewatch's model core: torch, numpy and pyarrow only (see the docs' architecture page).

Importing it has no side effects; process tuning lives in `vaewatch.model.process`.
"""
