"""The on-disk teacher store behind ``teacher.source=cache`` (re-exported from mentor.cache)."""

from mentor.cache.reader import CacheStore, open_store

__all__ = ["CacheStore", "open_store"]
