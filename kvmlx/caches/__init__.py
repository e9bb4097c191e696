"""How each mlx-lm cache type becomes artifact tensors and back, one module per cache family.

kv.py (`KVCache`), rotating.py (`RotatingKVCache`, sliding windows), arrays.py (`ArraysCache`,
recurrent state), quantized.py (`QuantizedKVCache` and mlx-lm's `--kv-bits` pipeline); families.py
picks the module per cache type, handles `CacheList`, refuses unknown types by name, and says which
prefixes of a stored document can be restored. runtime/ calls only these functions.
"""

from .families import (  # noqa: F401
    FAMILIES,
    RestoreInfo,
    check_model,
    check_supported,
    layer_groups,
    load_layer,
    model_specs,
    needs_checkpoint,
    quantization_of,
    restore_info,
    save_layer,
    spec,
    tensor_names,
    trimmable_to,
)
from .kv import StreamedKVCache, all_plain, from_arrays, kv_arrays  # noqa: F401
from .quantized import KVQuantization  # noqa: F401
