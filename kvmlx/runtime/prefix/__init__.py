"""The prefix cache: every prefix kvmlx computes, block-addressed, in memory and on disk (cache.py),
its SQLite index (index.py), how caches become records and back (layers.py), and what `kvmlx store`
does to it without a model (maintenance.py); the record files are `kvmlx.artifact.blockfile`.
Its names are imported on first use (`kvmlx.exports`): a command's options read `DEFAULT_BLOCK`
without importing the cache, its index and SQLite."""

from ...exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    ".layers": ("DEFAULT_BLOCK",),
    ".cache": ("PrefixCache", "PrefixCacheError", "Restored", "Saved", "default_disk_bytes", "default_ram_bytes"),
    ".maintenance": ("evict_to", "purge", "summary", "verify"),
})
