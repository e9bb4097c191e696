"""The zero-copy load path: runs only where MLX has Metal (Apple Silicon); skipped elsewhere."""

import mlx.core as mx
import pytest

from kvmlx.runtime.generate import compare, continue_from, from_scratch
from kvmlx.runtime.load import load_artifact, zero_copy_available
from kvmlx.runtime.publish import publish

pytestmark = pytest.mark.skipif(not zero_copy_available(), reason="needs MLX's Metal backend (Apple Silicon)")


def test_zero_copy_load_is_used_and_exact(tmp_path, tiny, document):
    tokens = tiny.tokenizer.encode(document)
    doc, suffix = tokens[:200], tokens[200:220]
    path = tmp_path / "doc.kvmlx"
    publish(tiny, doc, path, chunk_size=64)
    loaded = load_artifact(path, tiny)  # auto picks zero-copy on Metal
    assert loaded.load_path == "zero-copy"
    assert loaded.caches[0].keys.shape[2] == len(doc)  # the map itself: no headroom, no copy
    reuse = continue_from(tiny, loaded, suffix, max_tokens=24, stop_at_eos=False, keep_logits=True)
    scratch = from_scratch(tiny, doc, suffix, chunk_size=64, max_tokens=24, stop_at_eos=False, keep_logits=True)
    result = compare(reuse, scratch)
    assert result["token_exact"]
    assert result["max_abs_logit_diff"] <= 1e-2  # Metal kernels may tile differently per shape


def test_the_map_outlives_the_loader(tmp_path, tiny, document):
    """Arrays adopted from the map must stay valid after every kvmlx object is gone."""
    path = tmp_path / "doc.kvmlx"
    publish(tiny, tiny.tokenizer.encode(document)[:64], path)
    keys = load_artifact(path, tiny).caches[0].keys
    expected = load_artifact(path, tiny, load_path="copy").caches[0].keys[..., :64, :]
    assert mx.array_equal(keys, expected).item()
