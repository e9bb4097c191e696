"""The local content-addressed store and its prefix index (see `store.py`)."""

from .store import (  # noqa: F401
    BLOCK, OBJECT_SUFFIX, Entry, GcResult, ReindexResult, Store, StoreError, StorePublish,
    artifact_key, block_hashes, bucket_id, default_root, encoding_of, header_key, parse_size,
)
