"""Every teacher source, importable from one place (each lives in its own module)."""

from mentor.teachers.base import TeacherOutput, TeacherSource
from mentor.teachers.cached import CachedTeacher
from mentor.teachers.ema import EMATeacher
from mentor.teachers.ensemble import EnsembleTeacher
from mentor.teachers.online import OnlineTeacher, RunTeacher, linear_head

__all__ = [
    "CachedTeacher",
    "EMATeacher",
    "EnsembleTeacher",
    "OnlineTeacher",
    "RunTeacher",
    "TeacherOutput",
    "TeacherSource",
    "linear_head",
]
