"""Nothing loads silently: another model, tokenizer, dtype or prompt prefix is refused by name."""

import pytest

from kvmlx.artifact.identity import model_fingerprint, tokenizer_fingerprint
from kvmlx.errors import (
    DtypeMismatchError,
    IntegrityError,
    ModelMismatchError,
    PrefixMismatchError,
    TokenizerMismatchError,
)
from kvmlx.models import build_builtin, default_corpus, load_model
from kvmlx.runtime.generate import continue_from, verify
from kvmlx.runtime.load import load_artifact, split_prompt
from kvmlx.runtime.publish import publish


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny, document):
    path = tmp_path_factory.mktemp("art") / "doc.kvmlx"
    publish(tiny, tiny.tokenizer.encode(document)[:40], path, chunk_size=16)
    return path


def test_other_seed_is_another_model(tmp_path, artifact):
    other = load_model(str(build_builtin(tmp_path / "seed1", "tiny", seed=1)))
    with pytest.raises(ModelMismatchError, match="another model"):
        load_artifact(artifact, other)


def test_same_weights_other_tokenizer(tmp_path, tiny, artifact):
    corpus = default_corpus().upper()  # same richness, different byte pairs: another BPE, same vocab size
    other = load_model(str(build_builtin(tmp_path / "tok", "tiny", corpus=corpus)))
    assert model_fingerprint(other) == model_fingerprint(tiny)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tiny)
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        load_artifact(artifact, other)


def test_other_dtype(models, artifact):
    with pytest.raises(DtypeMismatchError, match="bfloat16 but the model runs in float32"):
        load_artifact(artifact, models("float32"))


def test_prompt_must_start_with_the_document(tiny, artifact):
    loaded = load_artifact(artifact, tiny)
    doc = loaded.tokens
    changed = doc[:10] + [(doc[10] + 1) % 100] + doc[11:] + [5]
    with pytest.raises(PrefixMismatchError, match="first difference at token 10"):
        split_prompt(loaded, changed)
    with pytest.raises(PrefixMismatchError, match="shorter"):
        split_prompt(loaded, doc[:-1])
    assert split_prompt(loaded, doc + [7, 8]) == [7, 8]


def test_tampered_tensor_is_refused_on_load(tmp_path, tiny, artifact):
    from kvmlx.artifact.format import Artifact

    with Artifact(artifact) as art:
        off = art.tensors["layers.2.values"].offset
    data = bytearray(artifact.read_bytes())
    data[off] ^= 0x01
    bad = tmp_path / "bad.kvmlx"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="layers.2.values"):
        load_artifact(bad, tiny)
    # the overlap path returns before layer 2 is checked: the first use of the KV must fail instead
    loaded = load_artifact(bad, tiny, load_path="overlap")
    with pytest.raises(IntegrityError, match="layers.2.values"):
        continue_from(tiny, loaded, [1, 2, 3], max_tokens=2)


def test_llama_family_works_too(tmp_path, document):
    """kvmlx is not Qwen3-only: any mlx-lm model with plain KV caches reuses exactly."""
    lm = load_model(str(build_builtin(tmp_path / "llama", "tiny", model_type="llama")))
    assert lm.config["model_type"] == "llama"
    path = tmp_path / "llama.kvmlx"
    publish(lm, document, path, chunk_size=32)
    report = verify(path, lm, " And then?", max_tokens=24)
    assert report.token_exact and report.max_abs_logit_diff == 0.0
