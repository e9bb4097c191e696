"""Typed errors: every refusal kvmlx makes is one of these, with a one-line message."""


class KvmlxError(Exception):
    """Base class of every error kvmlx raises on purpose."""


class ArtifactError(KvmlxError):
    """The artifact file itself is unreadable: wrong magic, truncated, corrupt or hostile."""


class UnsupportedVersionError(ArtifactError):
    """The artifact was written by a newer format version than this reader understands."""


class IntegrityError(ArtifactError):
    """A digest does not match: the header or a tensor was altered after publishing."""


class TrustError(KvmlxError):
    """The artifact's publisher is not established: unsigned, signed by an unknown key, or badly signed."""


class UnsignedArtifactError(TrustError):
    """A signed artifact was required and this one carries no signature."""


class UntrustedPublisherError(TrustError):
    """The signature is valid but its key is not in the local trust list."""


class BadSignatureError(TrustError, IntegrityError):
    """The artifact carries a signature that does not verify: the header was altered or re-signed wrongly."""


class KeyFileError(KvmlxError):
    """A signing key or public key id is unreadable, malformed, wrongly protected or of the wrong kind."""


class TrustListError(KvmlxError):
    """The local trust list is malformed, or an entry to change does not exist."""


class RecomputeMismatchError(KvmlxError):
    """Spot verification recomputed part of the KV and it differs from what the artifact stores."""


class MismatchError(KvmlxError):
    """The artifact is well-formed but was not produced for this model, tokenizer, dtype or prompt."""


class ModelMismatchError(MismatchError):
    """The artifact was computed by another model (weights, config or geometry differ)."""


class TokenizerMismatchError(MismatchError):
    """The artifact's token ids come from another tokenizer."""


class DtypeMismatchError(MismatchError):
    """The artifact's KV dtype differs from the dtype the model runs in."""


class PrefixMismatchError(MismatchError):
    """The agent's prompt does not start with the artifact's document tokens."""


class LayoutMismatchError(MismatchError):
    """The artifact was published under another parallel layout (tensor parallel, pipeline stages, one process)."""


class LossyArtifactError(MismatchError):
    """The artifact's KV is lossily encoded (quantised) but an exact load was required."""


class UnsupportedModelError(KvmlxError):
    """The model's caches are not plain mlx-lm KV caches (sliding window, quantized, recurrent...)."""


class UnsupportedParallelError(UnsupportedModelError):
    """A distributed run (tensor parallel, pipeline stages under mlx.launch) was asked for what only one
    process supports: caches other than plain KV (sliding windows, recurrent state) or --kv-bits KV."""


class BlendUnsupportedError(UnsupportedModelError):
    """Position-independent reuse (--blend) cannot move this model's stored KV to new positions exactly:
    dynamic NTK, no RoPE, ALiBi, sliding-window or recurrent caches, --kv-bits KV, or a failed gate."""


class ModelLoadError(KvmlxError):
    """The model could not be found or loaded."""


class CostError(KvmlxError, ValueError):
    """Inputs to the cost model are missing, inconsistent or out of range."""


class CacheMismatchError(MismatchError):
    """The artifact's per-layer caches (family, window, state slots, KV bits) differ from the model's."""


class KVQuantizationMismatchError(MismatchError):
    """The artifact's KV quantization settings (--kv-bits, group size, start) differ from this run's."""
