"""Prefix reuse where mlx-lm has none: a prompt sharing only part of a stored hybrid or sliding-window
document restarts from the deepest state checkpoint at or below the shared prefix, through the store's
index, the agent and the serving engine, token-exactly; `--kv-bits` KV is found only by agents with
the same settings."""

import mlx.core as mx
import pytest

from kvmlx.caches import KVQuantization
from kvmlx.runtime.agent import Agent
from kvmlx.runtime.generate import from_scratch
from kvmlx.runtime.publish import prefill
from kvmlx.runtime.store import Store
from kvmlx.serving.engine import Engine

CHUNK, EVERY = 32, 64


@pytest.fixture(scope="module", params=["hybrid", "sliding"])
def setup(request, preset, document, tmp_path_factory):
    lm = preset(request.param)
    tokens = lm.tokenizer.encode(document)
    doc = tokens[:250]
    store = Store(tmp_path_factory.mktemp(f"store-{request.param}"))
    agent = Agent(lm, store, cache=False)
    agent.publish(doc, chunk_size=CHUNK, checkpoint_every=EVERY)
    prompt = doc[:150] + tokens[400:430]  # shares 150 tokens, then diverges
    return lm, store, agent, doc, prompt


def test_the_index_knows_the_checkpoints(setup):
    lm, store, agent, doc, prompt = setup
    entry, matched = agent.lookup(prompt)
    assert matched == 150
    assert entry.restore == {"any_from": None, "points": [64, 128, 192, 250]}
    assert entry.deepest(150) == 128 and entry.deepest(250) == 250 and entry.deepest(63) == 0


def test_agent_reuses_the_deepest_checkpoint_exactly(setup):
    lm, store, agent, doc, prompt = setup
    report = agent.verify(prompt, max_tokens=24)
    assert report.reuse.reused_tokens == 128 and report.reuse.prefilled_tokens == len(prompt) - 128
    assert report.token_exact and report.tokens_compared == 24 and report.max_abs_logit_diff == 0.0
    # the whole document, and the document plus more, reuse its final state
    assert agent.generate(doc + prompt[150:160], max_tokens=2).reused_tokens == 250


def test_the_serving_engine_reuses_the_checkpoint_exactly(setup):
    lm, store, agent, doc, prompt = setup
    engine = Engine(lm, store, cache=False)
    for _ in range(2):  # the second request gets fresh caches from the resident copy
        caches, suffix, reused, key, logits, chunk, *_ = engine.prepare(list(prompt))
        assert reused == 128 and suffix == prompt[128:] and chunk == CHUNK
        logits = prefill(lm.model, suffix, caches, chunk)
        got = []
        for _ in range(12):
            got.append(int(mx.argmax(logits).item()))
            logits = lm.model(mx.array([[got[-1]]]), cache=caches)[0, -1]
        ref = from_scratch(lm, prompt[:128], prompt[128:], chunk_size=CHUNK, max_tokens=12, stop_at_eos=False)
        assert got == ref.tokens


def test_kv_bits_entries_serve_only_the_same_settings(tmp_path, tiny, document):
    tokens = tiny.tokenizer.encode(document)
    quant = KVQuantization(8, 32, 64)
    store = Store(tmp_path / "s")
    q_agent = Agent(tiny, store, kv_quant=quant, cache=False)
    q_agent.publish(tokens[:200], chunk_size=CHUNK)
    prompt = tokens[:150] + tokens[400:420]
    assert Agent(tiny, store, cache=False).lookup(prompt) is None  # full-precision agents never get quantized KV
    assert Agent(tiny, store, kv_quant=KVQuantization(8, 64, 64), cache=False).lookup(prompt) is None
    report = q_agent.verify(prompt, max_tokens=24)
    assert report.reuse.reused_tokens == 150  # quantized KV above `start` trims exactly
    assert report.token_exact and report.max_abs_logit_diff == 0.0
    assert q_agent.lookup(tokens[:40] + tokens[500:520])[0].deepest(40) == 0  # below `start`: not restorable
    # kvmlx serve --kv-bits: the engine finds it with the same settings only, and continues as mlx-lm would
    assert Engine(tiny, store, cache=False).prepare(list(prompt))[2] == 0
    caches, suffix, reused, *_ = Engine(tiny, store, kv_quant=quant, cache=False).prepare(list(prompt))
    assert reused == 150 and type(caches[0]).__name__ == "QuantizedKVCache"


def test_the_http_api_reuses_the_checkpoint_exactly(setup):
    """`kvmlx serve`'s OpenAI API (in process): a completion of the partly shared prompt reports the
    checkpoint's tokens as cached and returns the from-scratch greedy tokens."""
    from starlette.testclient import TestClient

    from kvmlx.serving.openai import Server

    lm, store, agent, doc, prompt = setup
    engine = Engine(lm, store, cache=False).start()
    try:
        with TestClient(Server(engine).app) as client:
            r = client.post("/v1/completions", json={"model": lm.model_id, "prompt": list(prompt), "max_tokens": 8,
                                                     "temperature": 0})
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 128
    ref = from_scratch(lm, prompt[:128], prompt[128:], chunk_size=CHUNK, max_tokens=8)  # stops at EOS, as the server
    assert body["choices"][0]["text"] == lm.tokenizer.decode(ref.tokens)
