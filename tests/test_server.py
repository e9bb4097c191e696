"""The OpenAI-compatible server: reuse of published KV, token-exact against prefill, usage, stats, concurrency.

The server runs in a subprocess on a free port of 127.0.0.1 (always terminated by the fixture's
finalizer) and is called with the official `openai` client; every request is bounded in tokens and time.
"""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from kvmlx.runtime.agent import chat_messages, chat_prefix_tokens, chat_prompt_tokens
from kvmlx.runtime.generate import from_scratch
from kvmlx.runtime.load import load_artifact
from kvmlx.runtime.publish import DEFAULT_CHUNK, prefill
from kvmlx.runtime.resident import ResidentKV, resident_from_loaded
from kvmlx.serving.engine import KVPool
from kvmlx.runtime.store import Store

CHUNK = 16
MAX = 16
DOC_LEN = 200
TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny, document, toks):
    """A server over a store holding a plain document (toks[:200]) and a chat-templated prefix."""
    store_dir = tmp_path_factory.mktemp("serve") / "store"
    store = Store(store_dir)
    doc_text = tiny.tokenizer.decode(toks[:DOC_LEN])
    doc_key = store.publish(tiny, toks[:DOC_LEN], chunk_size=CHUNK).key
    chat_doc = document[:600]
    chat_prefix = chat_prefix_tokens(tiny, chat_doc)
    chat_key = store.publish(tiny, chat_prefix, chunk_size=CHUNK).key
    port = _free_port()
    cmd = [sys.executable, "-m", "kvmlx", "serve", "--model", "builtin:tiny", "--dtype", "bfloat16", "--no-cache",
           "--store", str(store_dir), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not start in time")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
        yield dict(client=client, base=base, doc_key=doc_key, doc_text=doc_text, chat_doc=chat_doc,
                   chat_prefix=chat_prefix, chat_key=chat_key, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def reference(lm, prompt, reused, chunk=CHUNK, max_tokens=MAX):
    """What `kvmlx generate --verify` compares against: prefill the reused part, then the rest, from scratch."""
    doc, suffix = (prompt[:reused], prompt[reused:]) if reused else (prompt, [])
    return from_scratch(lm, doc, suffix, chunk_size=chunk, max_tokens=max_tokens).tokens


def stream_completion(client, **kw):
    text, final = [], None
    for ch in client.completions.create(stream=True, **kw):
        if ch.choices:
            text.append(ch.choices[0].text)
            if ch.choices[0].finish_reason:
                final = ch
    return "".join(text), final


def test_models(served):
    assert [m.id for m in served["client"].models.list().data] == ["builtin:tiny"]


@pytest.mark.parametrize("case", ["suffix", "partial", "whole", "inside", "none"])
def test_completions_exact(served, tiny, toks, case):
    q = toks[300:312]
    prompt, reused, chunk = {
        "suffix": (toks[:DOC_LEN] + q, DOC_LEN, CHUNK),
        "partial": (toks[:70] + q, 70, CHUNK),  # trimmed: the shared KV must stay whole for the others
        "whole": (toks[:DOC_LEN], DOC_LEN, CHUNK),  # the stored logits give the first token
        "inside": (toks[:64], 63, CHUNK),
        "none": (toks[400:440], 0, DEFAULT_CHUNK),
    }[case]
    client = served["client"]
    ref = reference(tiny, prompt, reused, chunk)
    r = client.completions.create(model="builtin:tiny", prompt=prompt, max_tokens=MAX)
    ext = r.model_extra["kvmlx"]
    assert ext["tokens"] == ref
    assert r.usage.prompt_tokens_details.cached_tokens == reused
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ref))
    assert ext["key"] == (served["doc_key"] if reused else None)
    text, final = stream_completion(client, model="builtin:tiny", prompt=prompt, max_tokens=MAX)
    assert text == r.choices[0].text
    assert final.model_extra["kvmlx"]["tokens"] == ref
    assert final.usage.prompt_tokens_details.cached_tokens == reused


def test_completions_text_prompt_reuses(served, tiny, toks):
    """A text prompt is tokenized as publish tokenizes documents, so the published document matches."""
    client = served["client"]
    prompt = served["doc_text"] + " and then"
    ids = list(tiny.tokenizer.encode(prompt))
    r = client.completions.create(model="builtin:tiny", prompt=prompt, max_tokens=MAX)
    reused = r.usage.prompt_tokens_details.cached_tokens
    assert reused >= DOC_LEN - 2 and r.usage.prompt_tokens == len(ids)
    assert r.model_extra["kvmlx"]["tokens"] == reference(tiny, ids, reused)
    assert len(set(r.model_extra["kvmlx"]["tokens"])) >= 6  # greedy output varies: the check is not vacuous


def test_chat_exact(served, tiny):
    client = served["client"]
    question = "What does the server reuse?"
    messages = chat_messages(served["chat_doc"], question)
    prompt = chat_prompt_tokens(tiny, served["chat_doc"], question)
    n = len(served["chat_prefix"])
    ref = reference(tiny, prompt, n)
    r = client.chat.completions.create(model="builtin:tiny", messages=messages, max_tokens=MAX)
    assert r.model_extra["kvmlx"]["tokens"] == ref and r.model_extra["kvmlx"]["key"] == served["chat_key"]
    assert r.usage.prompt_tokens_details.cached_tokens == n and r.usage.prompt_tokens == len(prompt)
    parts, final, usage = [], None, None
    for ch in client.chat.completions.create(model="builtin:tiny", messages=messages, max_tokens=MAX, stream=True,
                                             stream_options={"include_usage": True}):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            final = ch if ch.choices[0].finish_reason else final
        else:
            usage = ch.usage
    assert "".join(parts) == r.choices[0].message.content
    assert final.model_extra["kvmlx"]["tokens"] == ref
    assert usage.prompt_tokens_details.cached_tokens == n and usage.completion_tokens == len(ref)


def test_concurrent_clients(served, tiny, toks):
    """4 clients x 2 requests at once, over the same document and none: every answer stays exact."""
    client = served["client"]
    prompts = [(toks[:DOC_LEN] + toks[300 + 7 * i: 310 + 7 * i], DOC_LEN, CHUNK) for i in range(3)]
    prompts += [(toks[:90] + toks[350:360], 90, CHUNK), (toks[:DOC_LEN], DOC_LEN, CHUNK),
                (toks[420:450], 0, DEFAULT_CHUNK), (toks[:DOC_LEN] + toks[500:505], DOC_LEN, CHUNK),
                (toks[:40] + toks[100:110], 40, CHUNK)]
    refs = [reference(tiny, p, k, c) for p, k, c in prompts]
    results: dict[int, tuple] = {}

    def worker(w):
        for j in range(2):
            i = 2 * w + j
            if j == 0:
                r = client.completions.create(model="builtin:tiny", prompt=prompts[i][0], max_tokens=MAX)
                results[i] = (r.model_extra["kvmlx"]["tokens"], r.usage.prompt_tokens_details.cached_tokens)
            else:
                _, final = stream_completion(client, model="builtin:tiny", prompt=prompts[i][0], max_tokens=MAX)
                results[i] = (final.model_extra["kvmlx"]["tokens"], final.usage.prompt_tokens_details.cached_tokens)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    for i, (p, k, _) in enumerate(prompts):
        assert results[i] == (refs[i], k), i


def _stats(served):
    return httpx.get(served["base"] + "/v1/kvmlx/stats", timeout=10).json()


def test_disconnect_stops_generation(served, toks):
    before = _stats(served)
    stream = served["client"].completions.create(model="builtin:tiny", prompt=toks[:DOC_LEN] + toks[300:305], max_tokens=20000,
                                                 stream=True, extra_body={"ignore_eos": True})
    got = 0
    for ch in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while True:
        s = _stats(served)
        if s["active_requests"] == 0 and s["cancelled"] > before["cancelled"]:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert s["completion_tokens"] - before["completion_tokens"] < 20000


def test_stats_and_metrics(served, toks):
    client = served["client"]
    for _ in range(2):
        client.completions.create(model="builtin:tiny", prompt=toks[:DOC_LEN] + toks[330:340], max_tokens=2)
    s = _stats(served)
    doc = next(d for d in s["documents"] if d["key"] == served["doc_key"])
    assert doc["loads"] == 1 and doc["resident"]  # loaded once, shared by every request
    assert doc["requests"] >= 2 and doc["tokens_saved"] >= 2 * DOC_LEN and doc["num_tokens"] == DOC_LEN
    assert s["prefill_tokens_per_second"] > 0 and doc["compute_seconds_saved"] > 0
    assert s["cached_tokens"] >= doc["tokens_saved"]
    text = httpx.get(served["base"] + "/metrics", timeout=10).text
    assert f'kvmlx_document_loads_total{{key="{served["doc_key"]}"}} 1' in text
    assert "kvmlx_cached_tokens_total " in text and "# TYPE kvmlx_requests_total counter" in text


def test_bad_requests(served):
    client = served["client"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="builtin:tiny", prompt="", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="builtin:tiny", prompt="hi", max_tokens=0)


# ---- in process: the shared KV is never written ---------------------------------------------


def test_shared_kv_is_not_mutated(tmp_path, tiny, toks):
    import mlx.core as mx

    store = Store(tmp_path / "s")
    pub = store.publish(tiny, toks[:100], chunk_size=CHUNK)
    resident = resident_from_loaded(pub.key, load_artifact(pub.entry.path, tiny), CHUNK)
    shared = [a for c in resident.loaded.caches for a in (c.keys, c.values)]
    before = [np.array(a.astype(mx.float32)) for a in shared]
    for reuse, suffix in [(70, toks[300:320]), (100, toks[330:350]), (40, toks[:30]), (100, toks[360:365])]:
        got = _greedy(tiny, resident.request_caches(reuse), suffix, 5)  # writes past `reuse` into the request's caches
        assert got == reference(tiny, toks[:reuse] + suffix, reuse, max_tokens=5)
    after = [np.array(a.astype(mx.float32)) for a in shared]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert all(a.shape[2] == 100 for a in shared)


def _greedy(lm, caches, suffix, n):
    import mlx.core as mx

    logits, out = prefill(lm.model, suffix, caches, CHUNK), []
    for _ in range(n):
        out.append(int(mx.argmax(logits).item()))
        logits = lm.model(mx.array([[out[-1]]]), cache=caches)[0, -1]
    return out


def test_pool_lru():
    import mlx.core as mx

    def item(key, n):
        return ResidentKV(key, [0] * n, None, mx.zeros((4,)), CHUNK, 100 * n, 0.0)

    pool = KVPool(max_bytes=250)
    pool.put(item("a", 1))
    pool.put(item("b", 1))
    assert pool.get("a") is not None  # a is now the most recent
    pool.put(item("c", 1))  # 300 > 250: b (least recent) goes
    assert set(pool.items) == {"a", "c"} and pool.evictions == {"b": 1}
    pool.put(item("big", 3))  # larger than the budget: everything goes, itself included
    assert pool.items == {} and pool.nbytes == 0


def test_hostile_bodies_over_http(served):
    """Through uvicorn too: bodies that used to raise inside the server get 4xx, and the server lives on."""
    url = served["base"] + "/v1/completions"
    cases = {"[1]": 400, "null": 400, '"s"': 400, '{"prompt": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}": 400,
             '{"prompt": "x", "temperature": NaN}': 400, '{"prompt": "x", "seed": -1}': 400,
             '{"prompt": "x", "seed": 18446744073709551616}': 400, '{"prompt": "x\\ud800"}': 400,
             '{"prompt": "x", "stop": 5}': 400, '{"prompt": "x", "model": "gpt-4o"}': 404}
    for raw, status in cases.items():
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=TIMEOUT)
        assert r.status_code == status, (raw[:60], r.status_code, r.text[:200])
        assert r.json()["error"]["message"]
    assert served["client"].completions.create(model="builtin:tiny", prompt="hi", max_tokens=1).choices


def test_disconnect_cancels_prefill(served, toks):
    """A client that leaves while its long prompt is still prefilling stops the prefill (within a chunk)."""
    before = _stats(served)
    long_prompt = [5] + (toks * 40)[:19999]  # matches nothing: 20,000 tokens to prefill, 512 per chunk
    with httpx.stream("POST", served["base"] + "/v1/completions", timeout=TIMEOUT,
                      json={"model": "builtin:tiny", "prompt": long_prompt, "max_tokens": 1, "stream": True}):
        deadline = time.monotonic() + 20
        while _stats(served)["prefilled_tokens"] - before["prefilled_tokens"] < 1024:  # under way
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 20
    while (s := _stats(served))["cancelled"] == before["cancelled"] or s["active_requests"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    done = s["prefilled_tokens"] - before["prefilled_tokens"]
    time.sleep(0.5)
    assert _stats(served)["prefilled_tokens"] - before["prefilled_tokens"] == done < 20000
