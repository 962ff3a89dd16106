"""Model builders used by name for students (and toy teachers) in recipes."""

from mentor.students.builders import BUILDERS, build_model, load_model, save_model

__all__ = ["BUILDERS", "build_model", "load_model", "save_model"]
