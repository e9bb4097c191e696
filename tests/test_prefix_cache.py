"""The prefix cache: every prefix kvmlx computes is reused by the next prompt sharing it, bit-exactly,
across turns, restarts and processes; within budgets; safe against crashes, tampering and concurrency.

Conversations are built from the bundled document's tokens: turn k+1's prompt is turn k's prompt, its
answer, and 20 new tokens (a tool output). Blocks are 16 tokens here so that short prompts make many
records. "Restart" is a new Agent/Engine (new PrefixCache, empty memory tier) over the same store.
"""

import json
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from kvmlx.artifact import blockfile
from kvmlx.cli import main
from kvmlx.runtime.agent import Agent
from kvmlx.runtime.generate import from_scratch
from kvmlx.runtime.prefix import PrefixCache
from kvmlx.runtime.store import Store
from kvmlx.serving.engine import Engine, Job
from kvmlx.serving.openai import Server
from kvmlx.serving.sampling import Params

BLOCK = 16
ANSWER = 6
TURNS = 4


def cache_for(lm, root, **kw):
    return PrefixCache(lm, Store(root).root, block=BLOCK, min_tokens=BLOCK, **kw)


def agent_conversation(lm, toks, root, *, restart: bool):
    """TURNS greedy turns; a fresh Agent (and cache) before every turn with `restart`."""
    make = lambda: Agent(lm, Store(root), cache=cache_for(lm, root))  # noqa: E731
    agent, prompt, out = make(), list(toks[:60]), []
    for k in range(TURNS):
        if restart:
            agent = make()
        g = agent.generate(prompt, max_tokens=ANSWER, stop_at_eos=False, keep_logits=True)
        out.append((list(prompt), g))
        prompt = prompt + g.tokens + toks[100 + 20 * k: 120 + 20 * k]
    return out


@pytest.mark.parametrize("family", ["plain", "hybrid"])
def test_agent_turns_exact_across_restart(tiny, preset, toks, tmp_path, family):
    """A conversation answered with a restart before every turn (its prefixes read from disk) gives
    bit-identical tokens and logits to one agent that kept everything in memory, and to prefilling each
    prompt from scratch with the same split; every turn reuses all the previous turn computed."""
    lm = tiny if family == "plain" else preset("hybrid")
    kept = agent_conversation(lm, toks, tmp_path / "a", restart=False)
    fresh = agent_conversation(lm, toks, tmp_path / "b", restart=True)
    assert len({t for _, g in kept for t in g.tokens}) >= 6  # greedy output varies: not a vacuous comparison
    for k, ((prompt, a), (prompt_b, b)) in enumerate(zip(kept, fresh)):
        assert prompt == prompt_b and a.tokens == b.tokens
        assert all(np.array_equal(x, y) for x, y in zip(a.logits, b.logits))
        r = a.reused_tokens
        ref = from_scratch(lm, prompt[:r], prompt[r:], chunk_size=a.chunk_size, max_tokens=ANSWER, stop_at_eos=False,
                           keep_logits=True)
        assert ref.tokens == a.tokens and all(np.array_equal(x, y) for x, y in zip(ref.logits, a.logits))
        if k == 0:
            assert a.reused_tokens == b.reused_tokens == 0
            continue
        before = len(kept[k - 1][0]) + ANSWER - 1  # the previous prompt and answer (its last token never ran)
        assert a.reused_tokens == b.reused_tokens == before
        assert a.tiers == {"memory": before} and b.tiers == {"disk": before}


def recorder(events: dict, done: dict, key):
    """An `emit` for one job: its events go to events[key]; done[key] is set at its end."""
    def f(kind, payload):
        events[key].append((kind, payload))
        if kind in ("done", "error", "timeout"):
            done[key].set()
    return f


def run_engine(lm, root, convs, *, restart: bool, stream_params=None):
    """Turns of several conversations, all of a turn submitted together (one batch); returns per turn
    [(prompt, tokens, logprobs, start info)] per conversation."""
    make = lambda: Engine(lm, Store(root), cache=cache_for(lm, root)).start()  # noqa: E731
    eng = make()
    prompts = [list(c[0]) for c in convs]
    turns = []
    try:
        for k in range(TURNS):
            if restart and k:
                eng.stop()
                eng = make()
            events = [[] for _ in prompts]
            done = [threading.Event() for _ in prompts]
            for i, p in enumerate(prompts):
                eng.submit(Job(list(p), Params(max_tokens=ANSWER, ignore_eos=True, logprobs=True),
                               recorder(events, done, i)))
            assert all(d.wait(120) for d in done)
            row = []
            for i, ev in enumerate(events):
                assert not [p for kind, p in ev if kind == "error"], ev
                tokens = [p[0] for kind, p in ev if kind == "token"]
                lps = [p[1]["logprob"] for kind, p in ev if kind == "token"]
                start = [p for kind, p in ev if kind == "start"][0]
                row.append((list(prompts[i]), tokens, lps, start))
                prompts[i] = prompts[i] + tokens + convs[i][1][20 * k: 20 * k + 20]
            turns.append(row)
        stats = eng.stats()
    finally:
        eng.stop()
    return turns, stats


@pytest.mark.parametrize("family", ["plain", "hybrid"])
def test_engine_turns_exact_across_restart_batched(tiny, preset, toks, tmp_path, family):
    """Two conversations decoded in one batch per turn: a server restarted before every turn answers
    each turn with bit-identical tokens and logprobs to one that kept running, reusing every token the
    previous turn computed (its finish snapshot, for hybrid); alone (no batch), the same holds."""
    lm = tiny if family == "plain" else preset("hybrid")
    convs = [(toks[:50], toks[200:300]), (toks[:50] + toks[400:430], toks[500:600])]  # sharing a 50-token prefix
    kept, stats = run_engine(lm, tmp_path / "a", convs, restart=False)
    fresh, _ = run_engine(lm, tmp_path / "b", convs, restart=True)
    alone, _ = run_engine(lm, tmp_path / "c", convs[:1], restart=False)
    alone_fresh, _ = run_engine(lm, tmp_path / "d", convs[:1], restart=True)
    for k, (row_a, row_b) in enumerate(zip(kept, fresh)):
        for i, ((p, t, lp, s), (p2, t2, lp2, s2)) in enumerate(zip(row_a, row_b)):
            assert p == p2 and t == t2 and lp == lp2, (k, i)
            if k:
                prev = kept[k - 1][i]
                # the batch holds the KV of every answer token (mlx-lm runs one step ahead): all of it is reused
                assert s["cached_tokens"] == s2["cached_tokens"] >= len(prev[0]) + ANSWER - 1, (k, i, s)
                assert set(s["cached_by_tier"]) == {"memory"}, (k, i, s)
                assert sum(s2["cached_by_tier"].values()) == s2["cached_tokens"], (k, i, s2)
        if k:
            # restarted: the conversation restored first read all of it from disk. Which one that is depends
            # on arrival order, and the other may then find every record it needs in memory: when turn 0
            # saved conversation 0 first, conversation 1's chain runs through its last record (two shared
            # tokens), so conversation 1 restored first leaves all of conversation 0's prefix in memory.
            tiers = [s2["cached_by_tier"] for *_, s2 in row_b]
            assert any(t.get("memory", 0) == 0 and t.get("disk", 0) > 0 for t in tiers), (k, tiers)
        assert alone[k][0][:3] == alone_fresh[k][0][:3], k
        assert alone[k][0][3]["cached_tokens"] == alone_fresh[k][0][3]["cached_tokens"] == row_a[0][3]["cached_tokens"]
    pc = stats["prefix_cache"]
    assert pc["hits"] >= 2 * (TURNS - 1) and pc["tokens_reused"]["memory"] > 0 and pc["records_written"] > 0
    assert stats["cached_tokens_by_tier"]["memory"] == stats["cached_tokens"]


def test_engine_keeps_a_prompt_while_it_decodes(tiny, toks, tmp_path):
    """A prompt is kept when its prefill in the batch ends, not only when its request finishes: a
    request sharing it that arrives while the first still decodes reuses all but its last token (which
    the batch runs as the first decode input), from memory, and answers exactly as from scratch."""
    eng = Engine(tiny, Store(tmp_path / "s"), cache=cache_for(tiny, tmp_path / "s")).start()
    first_prompt, prompt = toks[:60], toks[:60] + toks[300:310]
    events = {"first": [], "second": []}
    done = {k: threading.Event() for k in events}
    try:
        first = Job(list(first_prompt), Params(max_tokens=4000, ignore_eos=True), recorder(events, done, "first"))
        eng.submit(first)
        deadline = time.monotonic() + 60
        while not any(k == "token" for k, _ in events["first"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        eng.submit(Job(list(prompt), Params(max_tokens=ANSWER, ignore_eos=True), recorder(events, done, "second")))
        assert done["second"].wait(60)
        assert not done["first"].is_set()  # still decoding when it was reused
        first.cancelled.set()
    finally:
        eng.stop()
    start = [p for k, p in events["second"] if k == "start"][0]
    assert start["cached_tokens"] == len(first_prompt) - 1 and start["cached_by_tier"] == {"memory": 59}, start
    tokens = [p[0] for k, p in events["second"] if k == "token"]
    ref = from_scratch(tiny, prompt[:59], prompt[59:], chunk_size=512, max_tokens=ANSWER, stop_at_eos=False)
    assert tokens == ref.tokens


def test_http_stream_and_not_keep_and_report(tiny, toks, tmp_path):
    """Streamed and non-streamed chat requests both leave their conversation cached; usage's
    cached_tokens counts it, and /metrics and /v1/kvmlx/stats report it by tier."""
    eng = Engine(tiny, Store(tmp_path / "s"), cache=cache_for(tiny, tmp_path / "s")).start()
    messages = [{"role": "system", "content": "You answer briefly. " * 8},
                {"role": "user", "content": tiny.tokenizer.decode(toks[:80])}]
    body = {"model": "builtin:tiny", "max_tokens": ANSWER, "temperature": 0}
    try:
        with TestClient(Server(eng).app) as client:
            first = client.post("/v1/chat/completions", json={**body, "messages": messages}).json()
            answer = first["choices"][0]["message"]["content"]
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
            lines = client.post("/v1/chat/completions", json={**body, "messages": messages, "stream": True,
                                                              "stream_options": {"include_usage": True}}).text.splitlines()
            usage = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
            metrics = client.get("/metrics").text
            assert 'kvmlx_cached_tokens_by_tier_total{tier="memory"}' in metrics
            assert "kvmlx_prefix_cache_bytes_written_total" in metrics
            stats = client.get("/v1/kvmlx/stats").json()
            assert stats["prefix_cache"]["tokens_reused"]["memory"] == usage["prompt_tokens_details"]["cached_tokens"]
    finally:
        eng.stop()


def test_cli_generate_reuses_another_process(tiny, toks, tmp_path):
    """`kvmlx generate` (a process of its own) continues a conversation an Agent in this process kept,
    and leaves its own continuation for the next one; --no-cache reuses nothing."""
    root = tmp_path / "store"
    agent = Agent(tiny, Store(root), cache=cache_for(tiny, root))
    g = agent.generate(toks[:90], max_tokens=ANSWER)
    prompt = tiny.tokenizer.decode(toks[:90] + g.tokens) + " more words follow here"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "kvmlx", "generate", "--store", str(root), "--dtype", "bfloat16", "-n", "3",
           "--prompt", prompt, "--cache-block", str(BLOCK), "--min-cache-tokens", str(BLOCK), "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout)
    assert out["reused_by_tier"].get("disk", 0) >= 80 and out["cache_written"]["records"] >= 1
    off = json.loads(subprocess.run(cmd + ["--no-cache"], capture_output=True, text=True, env=env, check=True).stdout)
    assert off["reused_tokens"] == 0 and off["cache_written"] == {}


def test_min_tokens_and_no_persist(tiny, toks, tmp_path):
    """Prompts under --min-cache-tokens write nothing; --no-persist keeps records in memory only."""
    root = Store(tmp_path / "s").root
    cache = PrefixCache(tiny, root, block=BLOCK, min_tokens=64)
    Agent(tiny, Store(root), cache=cache).generate(toks[:40], max_tokens=3)
    assert cache.stats()["records"] == 0
    mem = PrefixCache(tiny, tmp_path / "m", block=BLOCK, min_tokens=BLOCK, persist=False)
    agent = Agent(tiny, Store(tmp_path / "m"), cache=mem)
    agent.generate(toks[:60], max_tokens=3)
    assert agent.generate(toks[:60] + toks[70:80], max_tokens=3).tiers == {"memory": 60}
    assert not (tmp_path / "m" / "cache").exists()


def fill(cache, lm, toks, start: int, n: int):
    agent = Agent(lm, Store(cache.root.parent), cache=cache)
    return agent.generate(toks[start: start + n], max_tokens=2)


def test_budgets_and_eviction_order(tiny, toks, tmp_path):
    """The disk budget holds: least recently used leaves go first, a record with children stays while
    they exist; the memory budget holds too (the disk tier keeps what memory drops)."""
    root = Store(tmp_path / "s").root
    probe = PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK)
    fill(probe, tiny, toks, 0, 64)
    per_block = max(probe.index.get(k).file_bytes for k in probe.index.keys())
    budget = per_block * 9
    cache = PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK, disk_bytes=budget, ram_bytes=per_block * 2)
    shared = toks[:32]
    for j in range(4):  # four conversations sharing a 32-token prefix
        Agent(tiny, Store(root), cache=cache).generate(shared + toks[100 + 40 * j: 140 + 40 * j], max_tokens=2)
        st = cache.stats()
        assert st["disk_bytes"] <= budget and st["ram_bytes"] <= per_block * 2
    assert cache.stats()["evictions"]["disk"] > 0 and cache.stats()["evictions"]["memory"] > 0
    # the shared prefix still has children, so it was never evicted before them
    assert cache.match(shared + toks[100 + 40 * 3: 120 + 40 * 3]) >= 32
    # a leaf evicted never leaves a child without its parent behind
    keys = set(cache.index.keys())
    for key in keys:
        row = cache.index.get(key)
        assert row.parent == row.root or row.parent in keys


def test_tampered_record_is_quarantined(tiny, toks, tmp_path):
    """A record whose bytes changed is refused, moved to quarantine/, and its tokens recomputed:
    the answer equals the untampered one."""
    root = Store(tmp_path / "s").root
    fill(PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK), tiny, toks, 0, 70)
    rec = next(f for f in (root / "cache" / "records").rglob("*.kvblk") if blockfile.read_record(f).header["start"] == 0)
    data = bytearray(rec.read_bytes())
    data_offset = blockfile.PREAMBLE.unpack(bytes(data[:64]))[4]
    tensor = next(iter(blockfile.read_record(rec).tensors.values()))
    data[data_offset + tensor.offset + tensor.nbytes // 2] ^= 0xFF
    os.chmod(rec, 0o600)
    rec.write_bytes(bytes(data))
    cache = PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK)
    out = Agent(tiny, Store(root), cache=cache).generate(toks[:80], max_tokens=4)
    clean = Agent(tiny, Store(tmp_path / "x"), cache=False).generate(toks[:80], max_tokens=4)
    assert out.tokens == clean.tokens
    assert cache.stats()["quarantined"] == 1 and (root / "quarantine" / f"cache-{rec.stem}.kvblk").exists()
    with pytest.raises(Exception):
        blockfile.read_record(root / "quarantine" / f"cache-{rec.stem}.kvblk")


def test_file_modes_and_not_published(tiny, toks, tmp_path):
    """Cached records are 0600 in 0700 directories, never listed as store entries (so never served by
    serve-artifacts or pushed), and `store purge --cached` removes them; `store stats` tells them apart."""
    root = Store(tmp_path / "s").root
    fill(PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK), tiny, toks, 0, 70)
    files = list((root / "cache" / "records").rglob("*.kvblk"))
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    for d in [root / "cache", root / "cache" / "records", *{f.parent for f in files}]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert Store(root).ls() == []
    runner = CliRunner()
    st = json.loads(runner.invoke(main, ["store", "--dir", str(root), "stats", "--json"]).output)
    assert st["published"]["entries"] == 0 and st["cached"]["records"] == len(files)
    assert "cached (prefix cache, not published)" in runner.invoke(main, ["store", "--dir", str(root), "ls"]).output
    ok = runner.invoke(main, ["store", "--dir", str(root), "verify", "--cached", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output) == {"ok": len(files), "bad": []}
    victim = files[0]
    data = bytearray(victim.read_bytes())
    tensor = next(iter(blockfile.read_record(victim).tensors.values()))
    data[blockfile.PREAMBLE.unpack(bytes(data[:64]))[4] + tensor.offset] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = runner.invoke(main, ["store", "--dir", str(root), "verify", "--cached"])
    assert bad.exit_code == 1 and "BAD  cached" in bad.output and not victim.exists()
    files = files[1:]
    r = runner.invoke(main, ["store", "--dir", str(root), "purge", "--cached", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["records"] == len(files)
    assert not list((root / "cache").rglob("*.kvblk"))
    bad = runner.invoke(main, ["generate", "--prompt", "x", "--cache-disk", "lots"])
    assert bad.exit_code == 2 and "--cache-disk" in bad.output


def _writer(root, seed, n, out):
    """A separate process: writes and reads conversations into the shared store."""
    from kvmlx.models import load_model

    lm = load_model("builtin:tiny", dtype="bfloat16")
    toks = list(range(50, 50 + 400))
    rng = np.random.default_rng(seed)
    cache = PrefixCache(lm, root, block=BLOCK, min_tokens=BLOCK, disk_bytes=int(out["budget"]))
    agent = Agent(lm, Store(root), cache=cache)
    for _ in range(n):
        start = int(rng.integers(0, 3)) * 16
        agent.generate(toks[start: start + int(rng.integers(40, 90))], max_tokens=2)
    st = cache.stats()
    assert st["write_errors"] == 0 and st["quarantined"] == 0, st


def test_concurrent_writers_readers_and_gc(tiny, tmp_path):
    """Three processes write and read overlapping conversations while gc trims: no record is ever
    half-read or corrupt (none quarantined), the disk budget holds, and every record left verifies."""
    root = Store(tmp_path / "s").root
    budget = 3_000_000
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, s, 6, {"budget": budget})) for s in range(3)]
    for p in procs:
        p.start()
    runner = CliRunner()
    while any(p.is_alive() for p in procs):
        runner.invoke(main, ["store", "--dir", str(root), "gc", "--cache-max-bytes", str(budget)])
        time.sleep(0.2)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    files = list((root / "cache" / "records").rglob("*.kvblk"))
    assert files and sum(f.stat().st_size for f in files) <= budget
    for f in files:
        blockfile.read_record(f)  # every digest checks


def _killed_writer(root, ready):
    from kvmlx.artifact import blockfile as bf
    from kvmlx.models import load_model

    real = bf.write_record

    def slow(path, header, tensors, staging):  # stop dead in the middle of the second record's write
        if len(list(staging.iterdir())) == 0 and len(list((staging.parent / "records").rglob("*.kvblk"))) >= 1:
            import tempfile as tf
            fd, tmp = tf.mkstemp(prefix=".record.", suffix=".tmp", dir=staging)
            os.write(fd, b"\x89KVBLK\r\n" + bytes(100))
            ready.set()
            time.sleep(60)
        return real(path, header, tensors, staging)

    import kvmlx.runtime.prefix.cache as pc
    pc.write_record = slow
    lm = load_model("builtin:tiny", dtype="bfloat16")
    Agent(lm, Store(root), cache=PrefixCache(lm, root, block=BLOCK, min_tokens=BLOCK)).generate(list(range(50, 120)),
                                                                                                 max_tokens=2)


def test_crash_mid_write_leaves_nothing_that_loads(tiny, tmp_path):
    """A writer killed in the middle of a record leaves only a temp file nobody reads: the next lookup
    restores what was complete, and gc removes the leftover once it is stale."""
    root = Store(tmp_path / "s").root
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_killed_writer, args=(root, ready))
    p.start()
    assert ready.wait(120)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    cache = PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK)
    assert cache.stats()["records"] == 1 and cache.match(list(range(50, 120))) == BLOCK
    leftovers = list((root / "cache" / "tmp").iterdir())
    assert leftovers
    for f in leftovers:
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    r = CliRunner().invoke(main, ["store", "--dir", str(root), "gc", "--json"])
    assert json.loads(r.output)["cache"]["temp_removed"] == len(leftovers)


def test_quantized_kv_cached_exactly(tiny, toks, tmp_path):
    """With --kv-bits settings, cached turns restore quantized KV bit-exactly (restart included)."""
    from kvmlx.caches import KVQuantization

    quant = KVQuantization(8, 32, 40)
    root = tmp_path / "s"
    kw = dict(block=BLOCK, min_tokens=BLOCK, kv_quant=quant)
    a = Agent(tiny, Store(root), kv_quant=quant, cache=PrefixCache(tiny, Store(root).root, **kw))
    first = a.generate(toks[:60], max_tokens=4, stop_at_eos=False)
    prompt = toks[:60] + first.tokens + toks[200:220]
    kept = a.generate(prompt, max_tokens=4, stop_at_eos=False, keep_logits=True)
    root2 = Store(tmp_path / "s2").root
    Agent(tiny, Store(root2), kv_quant=quant, cache=PrefixCache(tiny, root2, **kw)).generate(toks[:60], max_tokens=4,
                                                                                           stop_at_eos=False)
    b = Agent(tiny, Store(root2), kv_quant=quant, cache=PrefixCache(tiny, root2, **kw))  # restarted
    again = b.generate(prompt, max_tokens=4, stop_at_eos=False, keep_logits=True)
    assert kept.reused_tokens == again.reused_tokens == 63 and again.tiers == {"disk": 63}
    assert kept.tokens == again.tokens and all(np.array_equal(x, y) for x, y in zip(kept.logits, again.logits))


@pytest.mark.parametrize("family", ["plain", "hybrid"])
def test_continuation_of_a_published_document(tiny, preset, toks, tmp_path, family):
    """A conversation that starts with a published document caches only what follows it (published KV
    is never stored twice); after a restart, the agent and the server reuse the document and the cached
    continuation together, bit-exactly against prefilling the same split from scratch."""
    lm = tiny if family == "plain" else preset("hybrid")
    root = tmp_path / "s"
    store = Store(root)
    store.publish(lm, toks[:64], chunk_size=16)
    first = Agent(lm, store, cache=cache_for(lm, root)).generate(toks[:64] + toks[100:120], max_tokens=4,
                                                                 stop_at_eos=False)
    assert first.tiers == {"published": 64} and first.cache_written["tokens"] == 20 + 3
    prompt = toks[:64] + toks[100:120] + first.tokens + toks[200:220]
    again = Agent(lm, store, cache=cache_for(lm, root)).generate(prompt, max_tokens=4, stop_at_eos=False,
                                                                 keep_logits=True)
    assert again.reused_tokens == 87 and again.tiers == {"published": 64, "disk": 23}
    ref = from_scratch(lm, prompt[:87], prompt[87:], chunk_size=again.chunk_size, max_tokens=4, stop_at_eos=False,
                       keep_logits=True)
    assert again.tokens == ref.tokens and all(np.array_equal(x, y) for x, y in zip(again.logits, ref.logits))
    eng = Engine(lm, store, cache=cache_for(lm, root))
    caches, suffix, reused, key, _, _, tiers, base = eng.prepare(list(prompt))
    assert reused >= 87 and tiers["published"] == 64 and base[1] == 64 and key == base[0]


def test_snapshots_inside_long_prompts(preset, toks, tmp_path):
    """A long prompt of a hybrid model leaves state snapshots at the auto spacing inside it, so a later
    prompt sharing only its first part restores from the deepest one below the divergence, exactly."""
    lm = preset("hybrid")
    root = tmp_path / "s"
    cache = cache_for(lm, root)
    Agent(lm, Store(root), chunk_size=16, cache=cache).generate(toks[:480], max_tokens=2)
    assert cache.stats()["snapshots_written"] >= 3  # inside (every 432 tokens here), the prompt's end, the finish
    other = toks[:450] + toks[500:530]
    g = Agent(lm, Store(root), chunk_size=16, cache=cache_for(lm, root)).generate(other, max_tokens=4,
                                                                                 stop_at_eos=False, keep_logits=True)
    assert 400 <= g.reused_tokens <= 450 and g.tiers == {"disk": g.reused_tokens}
    k = g.reused_tokens
    ref = from_scratch(lm, other[:k], other[k:], chunk_size=16, max_tokens=4, stop_at_eos=False, keep_logits=True)
    assert g.tokens == ref.tokens and all(np.array_equal(x, y) for x, y in zip(g.logits, ref.logits))


def chat_turns(lm, root, toks, *, restart: bool):
    """A 4-turn chat over HTTP, streamed and not in turn; the generated ids and their logprobs per turn."""
    make = lambda: Engine(lm, Store(root), cache=cache_for(lm, root)).start()  # noqa: E731
    eng = make()
    messages = [{"role": "system", "content": "You answer briefly. " * 6},
                {"role": "user", "content": lm.tokenizer.decode(toks[:70])}]
    out = []
    try:
        for k in range(TURNS):
            if restart and k:
                eng.stop()
                eng = make()
            body = {"model": "builtin:tiny", "messages": messages, "max_tokens": ANSWER, "temperature": 0,
                    "logprobs": True, "ignore_eos": True, "stream": k % 2 == 1}
            with TestClient(Server(eng).app) as client:
                r = client.post("/v1/chat/completions", json=body)
            if body["stream"]:
                events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
                ext = [e["kvmlx"] for e in events if "kvmlx" in e][0]
                lps = [c["logprob"] for e in events for ch in e["choices"] if ch.get("logprobs")
                       for c in ch["logprobs"]["content"]]
                text = "".join(ch["delta"].get("content") or "" for e in events for ch in e["choices"])
            else:
                data = r.json()
                ext, text = data["kvmlx"], data["choices"][0]["message"]["content"]
                lps = [c["logprob"] for c in data["choices"][0]["logprobs"]["content"]]
            out.append((ext["tokens"], lps, ext["cached_tokens"]))
            messages = messages + [{"role": "assistant", "content": text},
                                   {"role": "user", "content": lm.tokenizer.decode(toks[100 + 20 * k: 120 + 20 * k])}]
    finally:
        eng.stop()
    return out


def test_http_chat_exact_across_restart_stream_and_not(tiny, toks, tmp_path):
    """Over the OpenAI API, streamed and non-streamed turns of one chat: a server restarted before every
    turn gives the same ids and logprobs, and reuses the same cached tokens, as one that kept running."""
    kept = chat_turns(tiny, tmp_path / "a", toks, restart=False)
    fresh = chat_turns(tiny, tmp_path / "b", toks, restart=True)
    assert kept == fresh
    assert all(cached > 0 for _, _, cached in kept[1:])


def test_record_reader_refuses_hostile_files(tmp_path):
    """Truncated, re-typed, altered or out-of-bounds record files get a typed one-line error."""
    import blake3

    from kvmlx.errors import ArtifactError, IntegrityError

    data = np.arange(64, dtype=np.float32)
    path = tmp_path / "r.kvblk"
    header = {"key": "a" * 64, "parent": "b" * 64, "identity": "c" * 64, "root": "c" * 64, "kind": "segment",
              "start": 0, "tokens": [1, 2], "layers": {}}
    blockfile.write_record(path, header, [("0.keys", "float32", (1, 64), memoryview(data))], tmp_path)
    good = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert np.array_equal(np.frombuffer(blockfile.read_record(path).raw("0.keys"), np.float32), data)
    hlen, off = blockfile.PREAMBLE.unpack(good[:64])[3:5]

    def refused(raw, kind=ArtifactError):
        path.write_bytes(raw)
        with pytest.raises(kind) as e:
            blockfile.read_record(path)
        assert "\n" not in str(e.value)

    refused(good[:40])
    refused(b"X" + good[1:])
    refused(good[: len(good) - 10])
    body = good[64:64 + hlen].replace(b'"nbytes":256', b'"nbytes":999')
    refused(good[:64] + body + good[64 + hlen:], IntegrityError)  # the header digest no longer matches
    pre = blockfile.PREAMBLE.pack(blockfile.RECORD_MAGIC, 1, 0, hlen, off, blake3.blake3(body).digest())
    refused(pre + body + good[64 + hlen:])  # re-digested, but the tensor runs past the file
    flipped = bytearray(good)
    flipped[off + 8] ^= 1
    refused(bytes(flipped), IntegrityError)


def test_background_writes_are_found_at_once_and_on_disk_after_flush(tiny, toks, tmp_path, monkeypatch):
    """With `write_in_background` (the serving engine), a saved prefix is found by this process's next
    lookup while its files are still being written; another process (a second cache over the same root)
    finds it once they are (`flush`); the bytes counted are those written synchronously; a failed write
    is counted and loses nothing else."""
    root = Store(tmp_path / "s").root
    sync = PrefixCache(tiny, Store(tmp_path / "t").root, block=BLOCK, min_tokens=BLOCK)
    fill(sync, tiny, toks, 0, 70)
    gate, real = threading.Event(), blockfile.write_record
    monkeypatch.setattr("kvmlx.runtime.prefix.cache.write_record", lambda *a: gate.wait(30) and real(*a))
    cache = PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK)
    cache.write_in_background()
    fill(cache, tiny, toks, 0, 70)
    assert cache.stats()["pending_records"] > 0 and cache.match(toks[:70] + toks[80:90]) >= 64
    other = PrefixCache(tiny, root, block=BLOCK, min_tokens=BLOCK)
    assert other.match(toks[:70]) == 0
    gate.set()
    assert cache.flush(30)
    st, expected = cache.stats(), sync.stats()
    assert st["pending_records"] == 0 and other.match(toks[:70]) >= 64
    assert (st["records_written"], st["bytes_written"], st["disk_bytes"]) == \
        (expected["records_written"], expected["bytes_written"], expected["disk_bytes"])

    def refuse(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("kvmlx.runtime.prefix.cache.write_record", refuse)
    fill(cache, tiny, toks, 100, 40)
    assert cache.flush(30) and cache.stats()["write_errors"] >= 1 and cache.stats()["pending_records"] == 0
    assert cache.match(toks[:70]) >= 64  # what was on disk is still there
    cache.close()
