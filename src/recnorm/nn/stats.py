"""Batch statistics; moved to :mod:`recnorm.kernels.stats` (the kernels compute them). Kept as an alias."""

from recnorm.kernels.stats import batch_moments, count_valid, degenerate_features, sync_active, sync_max  # noqa: F401

__all__ = ["batch_moments", "degenerate_features", "count_valid", "sync_active", "sync_max"]
