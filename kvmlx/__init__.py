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

__version__ = "0.1.0"

from .artifact.format import Artifact, read_header  # noqa: E402
from .caches import KVQuantization  # noqa: E402
from .errors import (  # noqa: E402
    ArtifactError,
    CacheMismatchError,
    DtypeMismatchError,
    IntegrityError,
    KVQuantizationMismatchError,
    KvmlxError,
    MismatchError,
    ModelLoadError,
    ModelMismatchError,
    PrefixMismatchError,
    TokenizerMismatchError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .models import LoadedModel, load_model  # noqa: E402
from .runtime.agent import Agent, chat_prefix_tokens, chat_prompt_tokens  # noqa: E402
from .runtime.generate import (  # noqa: E402
    Generation,
    Verification,
    continue_from,
    from_scratch,
    generate,
    verify,
)
from .runtime.load import LoadedKV, load_artifact, split_prompt  # noqa: E402
from .runtime.publish import PublishResult, publish  # noqa: E402
from .runtime.restore import caches_at  # noqa: E402
from .runtime.store import Store, StoreError  # noqa: E402

__all__ = [
    "Agent", "Store", "StoreError", "chat_prefix_tokens", "chat_prompt_tokens",
    "Artifact", "ArtifactError", "DtypeMismatchError", "Generation", "IntegrityError", "KvmlxError", "LoadedKV",
    "LoadedModel", "MismatchError", "ModelLoadError", "ModelMismatchError", "PrefixMismatchError", "PublishResult",
    "TokenizerMismatchError", "UnsupportedModelError", "UnsupportedVersionError", "Verification", "continue_from",
    "from_scratch", "generate", "load_artifact", "load_model", "publish", "read_header", "split_prompt", "verify",
    "CacheMismatchError", "KVQuantization", "KVQuantizationMismatchError", "caches_at",
]
