"""Teacher sources: one interface that yields the teacher signal for a batch."""

from mentor.teachers.sources import (
    CachedTeacher,
    EMATeacher,
    EnsembleTeacher,
    OnlineTeacher,
    TeacherOutput,
    TeacherSource,
)
from mentor.teachers.taps import FeatureTaps

__all__ = [
    "CachedTeacher",
    "EMATeacher",
    "EnsembleTeacher",
    "FeatureTaps",
    "OnlineTeacher",
    "TeacherOutput",
    "TeacherSource",
]
