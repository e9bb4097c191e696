"""kvmlx: publish a document's KV cache once; load it with MLX and continue token-exactly.

    import kvmlx
    lm = kvmlx.load_model()                      # or "Qwen/Qwen3-4B", or a local path
    kvmlx.publish(lm, open("doc.txt").read(), "doc.kvmlx")
    kv = kvmlx.load_artifact("doc.kvmlx", lm)    # kv.caches work as mlx_lm prompt_cache=
    gen, _ = kvmlx.generate("doc.kvmlx", lm, "\\nQuestion: ...")

    agent = kvmlx.Agent(lm)                      # or: no paths at all, through the local store
    agent.publish(open("doc.txt").read())
    out = agent.generate(text + "\\nQuestion: ...")   # reuses the longest stored prefix; out.reused_tokens
"""

import time as _time

IMPORT_STARTED = _time.perf_counter()  # when kvmlx began importing (the CLI reports its import time from it)
__version__ = "0.1.0"

from .errors import (  # noqa: E402 - the errors are small, and `except kvmlx.KvmlxError` needs no import
    ArtifactError,
    CacheMismatchError,
    DtypeMismatchError,
    IntegrityError,
    KVQuantizationMismatchError,
    KvmlxError,
    LayoutMismatchError,
    MismatchError,
    ModelLoadError,
    ModelMismatchError,
    PrefixMismatchError,
    TokenizerMismatchError,
    UnsupportedModelError,
    UnsupportedParallelError,
    UnsupportedVersionError,
)
from .exports import lazy_exports  # noqa: E402

# The API, each name imported from its module on first use (kvmlx.exports).
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    ".artifact.format": ("Artifact", "read_header"),
    ".caches": ("KVQuantization",),
    ".models": ("LoadedModel", "load_model"),
    ".runtime.agent": ("Agent", "chat_prefix_tokens", "chat_prompt_tokens"),
    ".runtime.generate": ("Generation", "Verification", "continue_from", "from_scratch", "generate", "verify"),
    ".runtime.load": ("LoadedKV", "load_artifact", "split_prompt"),
    ".runtime.publish": ("PublishResult", "publish"),
    ".runtime.restore": ("caches_at",),
    ".runtime.store": ("Store", "StoreError"),
})

__all__ = [
    "Agent", "Store", "StoreError", "chat_prefix_tokens", "chat_prompt_tokens",
    "Artifact", "ArtifactError", "DtypeMismatchError", "Generation", "IntegrityError", "KvmlxError",
    "LayoutMismatchError", "LoadedKV",
    "LoadedModel", "MismatchError", "ModelLoadError", "ModelMismatchError", "PrefixMismatchError", "PublishResult",
    "TokenizerMismatchError", "UnsupportedModelError", "UnsupportedVersionError", "Verification", "continue_from",
    "from_scratch", "generate", "load_artifact", "load_model", "publish", "read_header", "split_prompt", "verify",
    "CacheMismatchError", "KVQuantization", "KVQuantizationMismatchError", "caches_at",
    "UnsupportedParallelError",
]
