"""Pruned and sparse students: masks (unstructured, N:M), structured width/depth pruning.

See docs/pruning.md. ``mentor.pruning.cts`` (Concrete Ticket Search, which uses the
``cts_kl`` loss) and ``mentor.pruning.structured`` are imported from their modules.
"""

from mentor.pruning.dsnot import FeatureStats, calibration_stats, dsnot
from mentor.pruning.masks import (
    ASTSchedule,
    MaskSet,
    calibration_norms,
    compute_masks,
    parse_pattern,
    prunable,
)

__all__ = [
    "ASTSchedule",
    "FeatureStats",
    "MaskSet",
    "calibration_norms",
    "calibration_stats",
    "compute_masks",
    "dsnot",
    "parse_pattern",
    "prunable",
]
