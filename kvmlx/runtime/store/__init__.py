"""The local content-addressed store and its prefix index.

`store.py` holds `Store` (the directory, its files and the layout), `index.py` the SQLite prefix
index, `keys.py` keys, prefix hashes and the small value types, `lock.py` the flocks, and
`maintenance.py` sync, quarantine and gc.
"""

from .keys import (  # noqa: F401
    BLOCK, OBJECT_SUFFIX, Entry, GcResult, ReindexResult, StoreError, StorePublish, artifact_key, block_hashes,
    bucket_id, default_root, encoding_of, header_key, parse_size,
)
from .store import Store, VerifyResult  # noqa: F401
