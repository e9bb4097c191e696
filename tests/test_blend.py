"""Documents anywhere in the prompt: finding them by token ids, selective recompute, R = 1.0 exactness."""

import numpy as np
import pytest

from kvmlx.runtime.blend import BlendSettings, BlendSettingsError, blend_prefill, prepare, select
from kvmlx.runtime.blend_find import DocumentIndex, Span
from kvmlx.runtime.generate import compare, decode_timed, from_scratch
from kvmlx.runtime.store import Store

CHUNK = 64


def test_documents_are_found_at_any_offset():
    rng = np.random.default_rng(0)
    a, b = rng.integers(10, 1000, 100).tolist(), rng.integers(10, 1000, 70).tolist()
    index = DocumentIndex({"a": a, "b": b})
    for pad in (0, 1, 7, 15, 33):
        prompt = [3] * pad + b + [5, 6, 7] + a + [9]
        spans = index.find(prompt)
        assert [(s.key, s.start, s.end, s.doc_start, s.doc_end) for s in spans] == [
            ("b", pad, pad + 70, 0, 70), ("a", pad + 73, pad + 173, 0, 100)]


def test_merged_edges_match_on_the_interior():
    rng = np.random.default_rng(1)
    doc = rng.integers(10, 1000, 90).tolist()
    index = DocumentIndex({"d": doc})
    # the document's first two and last token merged with the text around it (other ids in context)
    prompt = [1, 2, 3, 4001] + doc[2:-1] + [4002, 8]
    (s,) = index.find(prompt)
    assert (s.start, s.end, s.doc_start, s.doc_end) == (4, 4 + 87, 2, 89)
    assert prompt[s.start : s.end] == doc[s.doc_start : s.doc_end]


def test_short_or_absent_matches_are_ignored():
    rng = np.random.default_rng(2)
    doc = rng.integers(10, 1000, 64).tolist()
    index = DocumentIndex({"d": doc})
    assert index.find([1, 2] + doc[:20] + [3]) == []  # shorter than min_tokens
    assert index.find(rng.integers(1000, 2000, 200).tolist()) == []
    assert index.find(doc + [1], limit=40) == [Span("d", 0, 40, 0, 40, 64)]  # never past the limit


def test_select_rules():
    reused = np.array([False] * 4 + [True] * 20 + [False] * 2 + [True] * 10 + [False])
    spans = [Span("a", 4, 24, 0, 20, 20), Span("b", 26, 36, 0, 10, 10)]
    dev = np.arange(len(reused), dtype=np.float64)  # later tokens deviate more
    for rule in ("cacheblend", "epic", "anchored"):
        assert not select(rule, 0.0, spans, dev, reused).any()
        assert (select(rule, 1.0, spans, dev, reused) == reused).all()
        chosen = select(rule, 0.3, spans, dev, reused)
        assert not (chosen & ~reused).any()
    assert np.flatnonzero(select("cacheblend", 0.3, spans, dev, reused)).tolist() == list(range(27, 36))
    assert np.flatnonzero(select("epic", 0.3, spans, dev, reused)).tolist() == list(range(4, 10)) + list(range(26, 29))
    anchored = np.flatnonzero(select("anchored", 0.3, spans, dev, reused)).tolist()
    assert anchored[:2] == [4, 5] and 26 in anchored and len(anchored) == 9


def test_settings_parse_and_refuse():
    assert BlendSettings.of(None) is None and BlendSettings.of(False) is None
    assert BlendSettings.of(0.3).r == 0.3 and BlendSettings.of("epic:0.05").rule == "epic"
    assert BlendSettings.of("0.5").r == 0.5 and BlendSettings.of("cacheblend").rule == "cacheblend"
    assert BlendSettings.of({"r": 1, "rule": "epic"}).r == 1
    for bad in (1.5, -0.1, "nope", "epic:x", {"r": 0.1, "x": 1}, [0.1], True + 1.5):
        with pytest.raises(BlendSettingsError):
            BlendSettings.of(bad)


@pytest.fixture(scope="module")
def small(preset):
    return preset("small")


@pytest.fixture(scope="module")
def published(tmp_path_factory, small, document):
    """Two documents published into a store, and a prompt holding both behind a system prompt."""
    store = Store(tmp_path_factory.mktemp("blend-store"))
    tok = small.tokenizer
    words = document.split()
    doc_a, doc_b = " ".join(words[:60]), " ".join(words[200:250])
    for d in (doc_a, doc_b):
        store.publish(small, d, chunk_size=CHUNK)
    prompt = (tok.encode("System: answer from the documents.\n", add_special_tokens=False)
              + tok.encode(doc_b) + tok.encode("\n\n") + tok.encode(doc_a)
              + tok.encode("\nQuestion: what is it about?", add_special_tokens=False))
    return store, prompt


def _identity(lm):
    from kvmlx.artifact.identity import model_fingerprint, tokenizer_fingerprint

    return model_fingerprint(lm), tokenizer_fingerprint(lm), lm.dtype


def _blend(small, store, prompt, settings):
    b = prepare(small, store, prompt, settings, identity=_identity(small), chunk_size=CHUNK)
    gen = decode_timed(small, b.caches, b.logits, 16, started=0.0, reused=0, prefilled=0, stop_at_eos=False,
                       keep_logits=True)
    return b, gen


@pytest.mark.parametrize("rule", ["cacheblend", "epic", "anchored"])
def test_r_one_is_bit_identical_to_full_prefill(small, published, rule):
    store, prompt = published
    b, gen = _blend(small, store, prompt, BlendSettings(1.0, rule))
    ref = from_scratch(small, prompt, [], chunk_size=CHUNK, max_tokens=16, stop_at_eos=False, keep_logits=True)
    assert len(b.stats.documents) == 2 and b.stats.recomputed_tokens > 100
    assert b.stats.reused_tokens == 0 and not b.stats.approximate
    report = compare(gen, ref)
    assert report["token_exact"] and report["logits_identical"], report


def test_partial_recompute_reports_what_it_reused(small, published):
    store, prompt = published
    b, gen = _blend(small, store, prompt, BlendSettings(0.15, "cacheblend"))
    s = b.stats
    assert s.approximate and s.reused_tokens > 0 and s.recomputed_tokens > 0
    assert s.reused_tokens + s.recomputed_tokens + s.computed_tokens == len(prompt)
    assert s.full_layers == 2 and s.gate["identity_exact"]
    ref = from_scratch(small, prompt, [], chunk_size=CHUNK, max_tokens=16, stop_at_eos=False, keep_logits=True)
    assert compare(gen, ref)["max_abs_logit_diff"] > 0  # approximate: stored KV was used


def test_moving_keys_matters(small, published, monkeypatch):
    """Reusing the stored keys at their old positions (no re-rotation) is further from full prefill
    than moving them: the first logits row's distance to the reference."""
    import kvmlx.runtime.blend as blend_mod

    store, prompt = published
    ref = from_scratch(small, prompt, [], chunk_size=CHUNK, max_tokens=1, stop_at_eos=False, keep_logits=True)
    b, gen = _blend(small, store, prompt, BlendSettings(0.0, "epic"))
    moved = float(np.abs(gen.logits[0] - ref.logits[0]).mean())
    monkeypatch.setattr(blend_mod, "move_keys", lambda k, d, r: k)
    b, gen = _blend(small, store, prompt, BlendSettings(0.0, "epic"))
    unmoved = float(np.abs(gen.logits[0] - ref.logits[0]).mean())
    assert moved < unmoved


def test_no_documents_is_plain_prefill(small, published):
    store, _ = published
    prompt = small.tokenizer.encode("Nothing published here, only a question?")
    b, gen = _blend(small, store, prompt, BlendSettings(0.0))
    ref = from_scratch(small, prompt, [], chunk_size=CHUNK, max_tokens=16, stop_at_eos=False, keep_logits=True)
    assert b.stats.documents == [] and not b.stats.approximate
    assert compare(gen, ref)["logits_identical"]


@pytest.mark.parametrize("rule,r", [("cacheblend", 0.3), ("epic", 0.1), ("anchored", 0.5)])
def test_partial_path_is_right_where_stored_kv_is_exact(small, published, rule, r):
    """A document at the prompt's start has exactly the KV a full prefill computes, so blending it at any R
    must agree with full prefill up to rounding (this checks the recompute path's positions, mask and
    scatter: a wrong one moves the logits far more)."""
    store, _ = published
    tok = small.tokenizer
    prompt = store.tokens(store.ls()[-1].key) + tok.encode("\nQuestion: what is it about?", add_special_tokens=False)
    b, gen = _blend(small, store, prompt, BlendSettings(r, rule))
    assert b.stats.documents[0]["start"] == 0 and b.stats.recomputed_tokens > 0 and b.stats.reused_tokens > 0
    ref = from_scratch(small, prompt, [], chunk_size=CHUNK, max_tokens=16, stop_at_eos=False, keep_logits=True)
    spread = float(np.std(ref.logits[0]))
    assert float(np.max(np.abs(gen.logits[0] - ref.logits[0]))) < 0.05 * spread


def test_agent_blend_option(tmp_path, small, document):
    from kvmlx.runtime.agent import Agent

    agent = Agent(small, Store(tmp_path / "store"), chunk_size=CHUNK)
    words = document.split()
    doc_a, doc_b = " ".join(words[:50]), " ".join(words[300:340])
    for d in (doc_a, doc_b):
        agent.publish(d, chunk_size=CHUNK)
    tok = small.tokenizer
    prompt = (tok.encode("Tools: none.\n", add_special_tokens=False) + tok.encode(doc_a) + tok.encode(doc_b)
              + tok.encode(" Answer:", add_special_tokens=False))
    exact = agent.generate(prompt, max_tokens=8, stop_at_eos=False, keep_logits=True)  # off by default: exact path
    assert not hasattr(exact, "approximate") and exact.reused_tokens == 0
    full = agent.generate(prompt, max_tokens=8, stop_at_eos=False, keep_logits=True, blend=1.0)
    assert full.tokens == exact.tokens and all((a == b).all() for a, b in zip(full.logits, exact.logits))
    assert not full.approximate and full.recomputed_tokens > 60
    blended = Agent(small, agent.store, chunk_size=CHUNK, blend="cacheblend:0.1").generate(prompt, max_tokens=8)
    j = blended.to_json()
    assert j["approximate"] and j["reused_tokens"] + j["recomputed_tokens"] + j["computed_tokens"] == len(prompt)
    assert len(j["blend"]["documents"]) == 2 and j["blend"]["settings"]["rule"] == "cacheblend"


def test_cli_generate_blend(tmp_path, tiny, document):
    import json

    from click.testing import CliRunner

    from kvmlx.cli import main

    store, words = tmp_path / "store", document.split()
    docs = [" ".join(words[:60]), " ".join(words[100:150])]
    for k, d in enumerate(docs):
        (tmp_path / f"d{k}.txt").write_text(d, encoding="utf-8")
        assert CliRunner().invoke(main, ["publish", str(tmp_path / f"d{k}.txt"), "--store-dir", str(store)]).exit_code == 0
    prompt = "System: be brief.\n" + docs[1] + "\n" + docs[0] + "\nQ: what?"
    r = CliRunner().invoke(main, ["generate", "--store", str(store), "--prompt", prompt, "-n", 4, "--blend", "0.2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["approximate"] and out["reused_tokens"] > 0 and len(out["blend"]["documents"]) == 2
    assert out["reused_tokens"] + out["recomputed_tokens"] + out["computed_tokens"] == out["prompt_tokens"]
    words_out = CliRunner().invoke(main, ["generate", "--store", str(store), "--prompt", prompt, "-n", 2, "--blend"])
    assert words_out.exit_code == 0 and "approximate" in words_out.output and "recomputed" in words_out.output
    bad = CliRunner().invoke(main, ["generate", "--store", str(store), "--prompt", prompt, "--blend", "2"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    refused = CliRunner().invoke(main, ["generate", "-m", "builtin:hybrid", "--store", str(store), "--prompt", prompt,
                                        "--blend", "0.1"])
    assert refused.exit_code == 1 and "recurrent" in refused.output and len(refused.output.strip().splitlines()) == 1


def test_request_field():
    from kvmlx.serving.requests import BadRequest, blend

    server = BlendSettings(0.3, "epic")
    assert blend({}, server) is server and blend({"blend": None}, None) is None
    assert blend({"blend": False}, server) is None and blend({"blend": True}, None) == BlendSettings()
    assert blend({"blend": True}, server) is server and blend({"blend": 0.05}, None).r == 0.05
    assert blend({"blend": {"r": 1, "rule": "cacheblend"}}, None).rule == "cacheblend"
    for bad in (2, "x:0.1", {"r": "a"}, [1], {"nope": 1}):
        with pytest.raises(BadRequest) as e:
            blend({"blend": bad}, None)
        assert e.value.param == "blend" and "\n" not in str(e.value)


def test_server_hook_leaves_the_last_token(small, published):
    from kvmlx.runtime.blend import count, request_caches, usage_fields
    from kvmlx.runtime.publish import prefill

    store, prompt = published
    caches, suffix, stats = request_caches(small, store, prompt, BlendSettings(1.0), identity=_identity(small),
                                           chunk_size=CHUNK)
    assert suffix == prompt[-1:] and caches[0].offset == len(prompt) - 1
    assert stats.reused_tokens + stats.recomputed_tokens + stats.computed_tokens == len(prompt)
    logits = prefill(small.model, suffix, caches, CHUNK)
    ref = from_scratch(small, prompt[:-1], suffix, chunk_size=CHUNK, max_tokens=1, stop_at_eos=False, keep_logits=True)
    import mlx.core as mx

    assert (np.array(logits.astype(mx.float32)) == ref.logits[0]).all()
    u = usage_fields(stats)
    assert u["approximate"] is False and u["recomputed_tokens"] > 0
    metrics = {}
    count(metrics, stats)
    assert metrics["kvmlx_blend_requests_total"] == 1 and metrics["kvmlx_blend_approximate_requests_total"] == 0


def test_bench_blend_small_run(tmp_path, tiny):
    from kvmlx.measure.bench.blend import format_blend_table, load_rows, plot_blend, run_blend_bench, summarize_blend

    rows = tmp_path / "rows.jsonl"
    result = run_blend_bench(tiny, prompts=2, documents=4, per_prompt=(3, 3), doc_tokens=(40, 60), rs=(0.0, 1.0),
                             rules=("cacheblend", "anchored"), answer_tokens=4, chunk_size=32, rows_path=rows)
    assert len(result["rows"]) == 2 and all(len(r["runs"]) == 3 for r in result["rows"])
    r1 = [x for r in result["rows"] for x in r["runs"] if x["r"] == 1.0]
    assert all(x["identical"] and x["kl_first"] == 0.0 and not x["approximate"] for x in r1)
    r0 = [x for r in result["rows"] for x in r["runs"] if x["r"] == 0.0]
    assert all(x["documents_found"] == 3 and x["approximate"] and x["kl_first"] > 0 for x in r0)
    assert result["targets"]["r1_identical_tokens"] is True
    again = summarize_blend(load_rows(rows), rs=(0.0, 1.0), rules=("cacheblend", "anchored"))
    assert again["summary"] == result["summary"]
    assert "| anchored | 0 |" in format_blend_table(result)
    assert plot_blend(result, tmp_path / "p.png").stat().st_size > 1000
    # run again with the same file: it goes on from the prompts the file lacks (here one more), and
    # refuses a file written by another plan
    more = run_blend_bench(tiny, prompts=3, documents=4, per_prompt=(3, 3), doc_tokens=(40, 60), rs=(0.0, 1.0),
                           rules=("cacheblend", "anchored"), answer_tokens=4, chunk_size=32, rows_path=rows)
    assert [r["prompt"] for r in more["rows"]] == [0, 1, 2] and more["config"]["resumed_prompts"] == 2
    assert more["rows"][:2] == load_rows(rows)[:2] and len(load_rows(rows)) == 3
    odd = run_blend_bench(tiny, prompts=3, documents=4, per_prompt=(3, 3), doc_tokens=(40, 60), rs=(0.0,),
                          rules=("cacheblend",), answer_tokens=4, chunk_size=32, shard=(1, 2))
    assert [r["prompt"] for r in odd["rows"]] == [1] and odd["rows"][0]["documents"] == more["rows"][1]["documents"]
    with pytest.raises(ValueError, match="another plan"):
        run_blend_bench(tiny, prompts=3, documents=4, per_prompt=(3, 3), doc_tokens=(40, 60), rs=(0.0,),
                        rules=("cacheblend",), answer_tokens=4, chunk_size=32, rows_path=rows, seed=1)


def test_merged_edge_in_a_real_prompt(small, published):
    """The document after a space: its first word becomes " word" in context (other token ids), so the
    document is matched on its interior, and the merged tokens are computed."""
    store, _ = published
    entry = max(store.ls(), key=lambda e: e.num_tokens)
    doc = store.tokens(entry.key)
    text = small.tokenizer.decode(doc)
    prompt = small.tokenizer.encode("Intro: " + text + "tail? Answer:", add_special_tokens=False)
    assert doc[:2] != prompt[3:5] and doc[:2] not in [prompt[i : i + 2] for i in range(8)]  # the edge did merge
    b, gen = _blend(small, store, prompt, BlendSettings(0.15, "cacheblend"))
    (span,) = b.stats.documents
    assert span["doc_start"] > 0 and span["doc_end"] >= len(doc) - 2
    assert prompt[span["start"] : span["end"]] == doc[span["doc_start"] : span["doc_end"]]
    assert prompt[span["start"] - 1] != doc[span["doc_start"] - 1]  # the merged edge is not reused
    assert b.stats.computed_tokens >= len(prompt) - (span["end"] - span["start"])


def test_serve_blend_field(small, published, preset):
    """Through the OpenAI API: a request's `blend` field (or the server's default) blends; usage says what
    was reused, recomputed and computed, and whether it is approximate; /metrics counts it; blended KV
    never enters the prefix cache; a model blend cannot move gets a 400 naming the field."""
    from starlette.testclient import TestClient

    from kvmlx.serving.engine import Engine
    from kvmlx.serving.openai import Server

    store, prompt = published
    eng = Engine(small, store, prefill_chunk=CHUNK).start()
    body = {"model": small.model_id, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    try:
        with TestClient(Server(eng).app) as client:
            before = eng.stats()["prefix_cache"]["records_written"]
            full = client.post("/v1/completions", json={**body, "blend": 1.0}).json()
            part = client.post("/v1/completions", json={**body, "blend": "cacheblend:0.1"}).json()
            assert eng.stats()["prefix_cache"]["records_written"] == before  # approximate KV is never kept
            exact = client.post("/v1/completions", json=body).json()
            assert full["kvmlx"]["tokens"] == exact["kvmlx"]["tokens"] and full["usage"]["approximate"] is False
            u = part["usage"]
            assert u["approximate"] and u["reused_tokens"] > 0
            assert u["reused_tokens"] + u["recomputed_tokens"] + u["computed_tokens"] == len(prompt)
            assert "approximate" not in exact["usage"]
            metrics = client.get("/metrics").text
            assert "kvmlx_blend_requests_total 2" in metrics and "kvmlx_blend_approximate_requests_total 1" in metrics
            bad = client.post("/v1/completions", json={**body, "blend": "nonsense:2"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "blend"
    finally:
        eng.stop()
    hybrid = Engine(preset("hybrid"), store)
    with TestClient(Server(hybrid).app) as client:
        r = client.post("/v1/completions", json={**body, "model": preset("hybrid").model_id, "prompt": "hi", "blend": 0.2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "blend" and "\n" not in r.json()["error"]["message"]
