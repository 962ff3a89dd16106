"""Teacher-signal cache: run the teacher once, store sparse signals, train from them later.

``write_cache`` (writer), ``open_store``/``CacheStore`` (reader), ``verify_cache``, provenance
checks and the ``plan`` formulas. It is a store: it is handed a teacher function and
datasets, and never builds runs (that is ``mentor.assembly``). The on-disk format is
documented in ``docs/cache-format.md``.
"""

from mentor.cache.format import FORMAT_VERSION, CacheError, verify_cache
from mentor.cache.provenance import check_provenance, describe
from mentor.cache.reader import CacheStore, open_store
from mentor.cache.writer import CacheSettings, module_teacher, write_cache

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheSettings",
    "CacheStore",
    "check_provenance",
    "describe",
    "module_teacher",
    "open_store",
    "verify_cache",
    "write_cache",
]
