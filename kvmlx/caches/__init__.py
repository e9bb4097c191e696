"""How each mlx-lm cache type becomes artifact tensors and back, one module per cache family.

Today only plain `KVCache` (kv.py); a model whose caches are anything else is refused by name.
Add a family as a module here that turns its cache into named tensors (plus the metadata a header
needs) and back into the same mlx-lm class, bit-exactly; runtime/ calls only these functions.
"""

from .kv import StreamedKVCache, check_supported, from_arrays, kv_arrays  # noqa: F401
