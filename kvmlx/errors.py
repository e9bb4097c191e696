"""Typed errors: every refusal kvmlx makes is one of these, with a one-line message."""


class KvmlxError(Exception):
    """Base class of every error kvmlx raises on purpose."""


class ArtifactError(KvmlxError):
    """The artifact file itself is unreadable: wrong magic, truncated, corrupt or hostile."""


class UnsupportedVersionError(ArtifactError):
    """The artifact was written by a newer format version than this reader understands."""


class IntegrityError(ArtifactError):
    """A digest does not match: the header or a tensor was altered after publishing."""


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


class LossyArtifactError(MismatchError):
    """The artifact's KV is lossily encoded (quantised) but an exact load was required."""


class UnsupportedModelError(KvmlxError):
    """The model's caches are not plain mlx-lm KV caches (sliding window, quantized, recurrent...)."""


class ModelLoadError(KvmlxError):
    """The model could not be found or loaded."""


class CostError(KvmlxError, ValueError):
    """Inputs to the cost model are missing, inconsistent or out of range."""
