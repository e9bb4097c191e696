"""Store keys and prefix hashes, and the store's small value types: what the KV is a function of.

Key: BLAKE3 hex of canonical JSON of (model fingerprint, tokenizer fingerprint, KV dtype, token ids),
plus the encoding's name for lossily encoded (quantised) KV, which is different KV. KV computed with
mlx-lm's `--kv-bits` pipeline is other KV too: its dtype is named with those settings (`kv_variant`). The same tokens
for the same model, tokenizer and dtype are one entry, whoever published them; lossless encodings
(raw, zstd) of the same KV are the same entry. A bucket (model, tokenizer, dtype, exact or lossy) is
what must be equal for KV to be reusable at all; `block_hashes` chains BLAKE3 over its BLOCK-token
blocks for the prefix index (`index.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import blake3
import numpy as np

from ...artifact.format import ENCODINGS, canonical_json
from ...caches import RestoreInfo
from ...errors import KvmlxError
from ...models import kvmlx_home

if TYPE_CHECKING:
    from ..publish import PublishResult

BLOCK = 16  # tokens per prefix block (vLLM's default block size)
KEY_VERSION = 1
OBJECT_SUFFIX = ".kvmlx"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_BYTES = 16


class StoreError(KvmlxError):
    """A store operation failed: unknown or ambiguous key, unusable store directory."""


@dataclass(frozen=True)
class Entry:
    """One stored artifact, as the index describes it (the file's header is the source of truth)."""

    key: str
    path: Path
    model_id: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    num_tokens: int
    chunk_size: int
    file_bytes: int
    text_blake3: str | None
    signed: bool
    added: float
    last_used: float
    encoding: str = "raw"
    lossless: bool = True  # False: quantised KV, not token-exact; automatic reuse skips it unless allowed
    restore: dict | None = None  # which prefixes can be restored (caches.RestoreInfo as JSON); None: any

    def deepest(self, n: int) -> int:
        """The deepest prefix length at or below `n` this entry restores exactly (state checkpoints)."""
        return n if self.restore is None else RestoreInfo.from_json(self.restore).deepest(n)

    def to_json(self) -> dict:
        return {
            "key": self.key, "path": str(self.path), "model": self.model_id,
            "model_fingerprint": self.model_fingerprint, "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "dtype": self.dtype, "tokens": self.num_tokens, "chunk_size": self.chunk_size, "restore": self.restore,
            "file_bytes": self.file_bytes, "text_blake3": self.text_blake3, "signed": self.signed,
            "added": self.added, "last_used": self.last_used, "encoding": self.encoding, "lossless": self.lossless,
        }


@dataclass
class StorePublish:
    """What `Store.publish` did: the entry, and the publish result unless the key was already stored."""

    key: str
    entry: Entry
    result: "PublishResult | None"  # None when `existed`: no prefill ran
    existed: bool


@dataclass
class GcResult:
    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    temp_removed: int = 0
    quarantine_removed: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ReindexResult:
    indexed: int = 0  # files (re)indexed from their headers
    dropped: int = 0  # index rows whose file is gone
    skipped: list[str] = field(default_factory=list)  # files in objects/ that are not valid store objects

    def to_json(self) -> dict:
        return dict(self.__dict__)


def default_root() -> Path:
    """`kvmlx_home() / "store"` ($KVMLX_HOME/store, else ~/.cache/kvmlx/store)."""
    return kvmlx_home() / "store"


def artifact_key(model_fp: str, tokenizer_fp: str, dtype: str, tokens: Sequence[int], lossy: str | None = None) -> str:
    """The store key: BLAKE3 hex of canonical JSON of what the KV is a function of.

    `lossy` names a lossy encoding (the KV then differs from the computed one); lossless encodings
    store the same KV and share the raw key.
    """
    material = {"kvmlx_store_key": KEY_VERSION, "model": model_fp, "tokenizer": tokenizer_fp, "dtype": dtype,
                "tokens": [int(t) for t in tokens]}
    if lossy is not None:
        material["lossy_encoding"] = lossy
    return blake3.blake3(canonical_json(material)).hexdigest()


def encoding_of(header: dict) -> tuple[str, bool]:
    """(KV encoding, lossless?) of a header; losslessness comes from kvmlx's table, not the header's word."""
    encoding = header["kv"].get("encoding", "raw")
    return encoding, bool(ENCODINGS.get(encoding, False))


def kv_variant(dtype: str, quantization: dict | None = None) -> str:
    """The KV's dtype, plus mlx-lm's `--kv-bits` settings where it was computed with them (other KV)."""
    if not quantization:
        return dtype
    return f"{dtype}+kv{quantization['bits']}g{quantization['group_size']}s{quantization['start']}"


def header_variant(header: dict) -> str:
    return kv_variant(header["kv"]["dtype"], header["kv"].get("quantization"))


def header_key(header: dict) -> str:
    encoding, lossless = encoding_of(header)
    return artifact_key(header["model"]["fingerprint"], header["tokenizer"]["fingerprint"], header_variant(header),
                        header["document"]["tokens"], None if lossless else encoding)


def bucket_id(model_fp: str, tokenizer_fp: str, dtype: str, exact: bool = True) -> str:
    """What must be equal for KV to be reusable at all: one bucket of the index per (model, tokenizer,
    dtype), with lossily encoded KV in a bucket of its own."""
    return blake3.blake3(canonical_json({"kvmlx_bucket": KEY_VERSION, "model": model_fp, "tokenizer": tokenizer_fp,
                                         "dtype": dtype, "kv": "exact" if exact else "lossy"})).hexdigest()[:32]


def block_hashes(bucket: str, tokens: Sequence[int] | np.ndarray, block: int = BLOCK) -> list[bytes]:
    """Chained hashes of tokens[:block], tokens[:2*block], ... (whole blocks only)."""
    arr = _pack(tokens)
    h = bytes.fromhex(bucket)
    out = []
    step = 4 * block
    for end in range(step, len(arr) + 1, step):
        h = blake3.blake3(h + arr[end - step : end]).digest(_HASH_BYTES)
        out.append(h)
    return out


def parse_size(text: str | int) -> int:
    """'1500', '10M', '2.5G', '1GiB' -> bytes (K/M/G/T: powers of 1000; KiB/MiB/GiB/TiB: of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G, 1GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


def _pack(tokens: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(tokens, dtype="<u4").tobytes()


def _common_tokens(a: bytes, b: bytes) -> int:
    """Length in tokens of the common prefix of two packed uint32 token strings."""
    n = min(len(a), len(b)) // 4
    for i in range(n):
        if a[4 * i : 4 * i + 4] != b[4 * i : 4 * i + 4]:
            return i
    return n
