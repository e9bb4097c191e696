"""The prefix cache: every prefix kvmlx computes, block-addressed, in memory and on disk (cache.py),
its SQLite index (index.py), how caches become records and back (layers.py), and what `kvmlx store`
does to it without a model (maintenance.py); the record files are `kvmlx.artifact.blockfile`."""

from .cache import (  # noqa: F401
    DEFAULT_BLOCK,
    PrefixCache,
    PrefixCacheError,
    Restored,
    Saved,
    default_disk_bytes,
    default_ram_bytes,
)
from .maintenance import evict_to, purge, summary, verify  # noqa: F401
