"""Teacher sources behind one interface: ``teacher(batch) -> TeacherOutput``.

Each source is a class registered by name (``SOURCES``; ``teacher.source`` in a recipe) in its
own module of this package; every module here is imported so that its sources register.
"""

import importlib
import pkgutil

from mentor.models.taps import FeatureTaps
from mentor.teachers.base import (
    SOURCES,
    SourceContext,
    TeacherOutput,
    TeacherSource,
    register_source,
)

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

from mentor.teachers.sources import (  # noqa: E402
    CachedTeacher,
    EMATeacher,
    EnsembleTeacher,
    OnlineTeacher,
    RunTeacher,
    linear_head,
)

__all__ = [
    "SOURCES",
    "CachedTeacher",
    "EMATeacher",
    "EnsembleTeacher",
    "FeatureTaps",
    "OnlineTeacher",
    "RunTeacher",
    "SourceContext",
    "TeacherOutput",
    "TeacherSource",
    "linear_head",
    "register_source",
]
