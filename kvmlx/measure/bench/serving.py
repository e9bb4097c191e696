"""`kvmlx bench --serve`: `kvmlx serve` against `mlx_lm.server` on the same model and document, driven by
the official `openai` client.

A document of `doc_tokens` tokens is published into a fresh store. Then, for each server in turn (the
order alternates between repeats, so the machine's other load falls on both), a fresh server process
is started and timed: its **first** request (mlx_lm.server must prefill the document; kvmlx loads it
from the store), then `rounds` streaming requests per client at each **concurrency** (1, 4, 8, 16
clients at once; each prompt is the document plus its own question, `max_tokens` tokens): aggregate
completion tokens per second over the level's wall time and time to first token (TTFT) p50/p95; then
the server is **restarted** and its first request timed again. mlx_lm.server's in-memory prompt cache
is warm after its first request, as its users would run it. The **fairness** probe sends a long prompt
(`long_tokens`, matching nothing) and, `probe_delay` seconds later, a 2-token request, and times the
short one's answer; then the long one's client leaves. Nothing here imports the servers: they run as
subprocesses (`python -m kvmlx serve`, `python -m mlx_lm server`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from importlib import resources
from typing import Callable

import numpy as np

from ...models import load_model
from ...runtime.publish import DEFAULT_CHUNK
from ...runtime.store import Store
from .machine import machine_info

SERVERS = ("kvmlx", "mlx_lm")
DEFAULT_CONCURRENCY = (1, 4, 8, 16)
STARTUP_TIMEOUT = 300.0
REQUEST_TIMEOUT = 900.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(kind: str, model: str, path, store: Store, log_dir: str, extra: tuple[str, ...] = (),
            info: dict | None = None):
    """A fresh server process on a free port: yields (base url, model name to send, start-up seconds).
    `extra`: more `kvmlx serve` options; `info` (if given) gets the process id as "pid"."""
    port = _port()
    if kind == "kvmlx":
        cmd = [sys.executable, "-m", "kvmlx", "serve", "--model", model, "--store", str(store.root), "--port", str(port),
               *extra]
        name = model
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port", str(port)]
        name = "default_model"
    env = {**os.environ, "HF_HUB_CACHE": os.path.join(log_dir, "hf")}  # mlx_lm.server needs one (docs/SERVER.md)
    log = open(os.path.join(log_dir, f"{kind}-{port}.log"), "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if info is not None:
        info["pid"] = proc.pid
    base = f"http://127.0.0.1:{port}"
    import httpx  # here, not at the top: every `kvmlx` command imports this module (30-40 ms)

    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited with {proc.returncode} (log: {log.name})")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > STARTUP_TIMEOUT:
                raise RuntimeError(f"{kind} server did not start in {STARTUP_TIMEOUT:.0f} s (log: {log.name})")
            time.sleep(0.1)
        yield base, name, time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _stream(client, name: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: time to first token, wall time, completion tokens."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    for ch in client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                        stream=True, stream_options={"include_usage": True}):
        if first is None and ch.choices and ch.choices[0].text:
            first = time.perf_counter() - t0
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft": first if first is not None else total, "seconds": total, "tokens": tokens}


def _client(base: str):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)


def _level(base: str, name: str, document: str, clients: int, rounds: int, max_tokens: int, tag: str) -> dict:
    """`clients` threads at once, each sending `rounds` requests one after another."""
    results: list[dict] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def work(i: int) -> None:
        client = _client(base)
        barrier.wait()
        for r in range(rounds):
            q = f"\n\nQuestion {tag}-{clients}-{i}-{r}: what does the text say about point {i * rounds + r}?"
            try:
                results.append(_stream(client, name, document + q, max_tokens))
            except Exception as e:  # reported, not raised: one failed request must not hide the others
                errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "wall_seconds": wall,
            "completion_tokens": tokens, "tokens_per_second": tokens / wall if wall > 0 else None,
            "ttft_p50": float(np.percentile(ttft, 50)) if ttft else None,
            "ttft_p95": float(np.percentile(ttft, 95)) if ttft else None, "ttft": ttft}


def _fairness(base: str, name: str, long_prompt: str, delay: float, timeout: float) -> dict:
    """A long prompt, then after `delay` s a 2-token request: how long the short one took; then the long
    one's client leaves (its socket is closed: the server should stop that prefill)."""
    import json as _json
    from urllib.parse import urlsplit

    u = urlsplit(base)
    body = _json.dumps({"model": name, "prompt": long_prompt, "max_tokens": 1, "stream": True}).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=REQUEST_TIMEOUT)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (u.netloc.encode(), len(body)) + body)
    time.sleep(delay)
    t0 = time.perf_counter()
    try:
        short = _client(base).with_options(timeout=timeout).completions.create(
            model=name, prompt="Hi", max_tokens=2, temperature=0.0)
        short_s, answered = time.perf_counter() - t0, bool(short.choices)
    except Exception:
        short_s, answered = time.perf_counter() - t0, False
    sock.close()  # the long prompt's client leaves
    return {"short_seconds": short_s, "answered": answered, "timeout_seconds": timeout, "delay_seconds": delay}


def document_text(lm, tokens: int) -> str:
    """About `tokens` tokens of the bundled sample document (repeated as needed), as text."""
    text = resources.files("kvmlx").joinpath("data/sample_document.txt").read_text(encoding="utf-8")
    ids = list(lm.tokenizer.encode(text))
    while len(ids) < tokens:
        text += "\n\n" + text
        ids = list(lm.tokenizer.encode(text))
    return lm.tokenizer.decode(ids[:tokens])


def run_serve_bench(model: str = "builtin:small", *, doc_tokens: int = 1024,
                    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY, rounds: int = 2, max_tokens: int = 16,
                    repeats: int = 1, long_tokens: int = 0, probe_delay: float = 2.0, probe_timeout: float = 300.0,
                    servers: tuple[str, ...] = SERVERS,
                    progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Run the comparison; a JSON-ready dict (machine, config, per-server runs, summary, targets)."""
    import httpx

    lm = load_model(model)
    document = document_text(lm, doc_tokens)
    steps = repeats * len(servers) * (len(concurrency) + 2 + (1 if long_tokens else 0))
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps, what)

    with tempfile.TemporaryDirectory(prefix="kvmlx-bench-serve-") as tmp:
        store = Store(os.path.join(tmp, "store"))
        pub = store.publish(lm, document)
        store.close()  # from here on only copied, one copy per repeat
        # the long prompt matches nothing in the store (its first character differs from the document's)
        long_prompt = "Z" + document_text(lm, long_tokens) if long_tokens else ""
        runs: dict[str, list[dict]] = {s: [] for s in servers}
        for rep in range(repeats):
            order = servers if rep % 2 == 0 else tuple(reversed(servers))
            # each repeat's kvmlx starts from the published document alone: an earlier repeat's prefix
            # cache would hold its first and restart prompts whole
            rep_store = Store(shutil.copytree(store.root, os.path.join(tmp, f"store-{rep}")))
            for kind in order:
                run: dict = {"repeat": rep}
                with _server(kind, model, lm.path, rep_store, tmp) as (base, name, startup):
                    run["startup_seconds"] = startup
                    run["first"] = _stream(_client(base), name, document + "\n\nQuestion: what is this about?",
                                           max_tokens)
                    tick(f"{kind} first")
                    run["levels"] = []
                    for c in concurrency:
                        run["levels"].append(_level(base, name, document, c, rounds, max_tokens, f"r{rep}"))
                        tick(f"{kind} x{c}")
                    if long_tokens:
                        stats = (lambda: httpx.get(base + "/v1/kvmlx/stats", timeout=30).json()) if kind == "kvmlx" else None
                        st0 = stats() if stats else None
                        run["fairness"] = _fairness(base, name, long_prompt, probe_delay, probe_timeout)
                        if stats:  # one prefill chunk's time, from the server's counters over the probe
                            t1 = time.perf_counter()  # the long prompt's client left: wait for its cancellation
                            while ((st1 := stats())["cancelled"] == st0["cancelled"] and st1["active_requests"]
                                   and time.perf_counter() - t1 < 120):
                                time.sleep(0.5)
                            n = st1["prefilled_tokens"] - st0["prefilled_tokens"]
                            s = st1["prefill_seconds"] - st0["prefill_seconds"]
                            run["fairness"].update(chunk_tokens=DEFAULT_CHUNK, long_prefilled_tokens=n,
                                                   chunk_seconds=DEFAULT_CHUNK * s / n if n else None,
                                                   cancelled=st1["cancelled"] - st0["cancelled"])
                        tick(f"{kind} fairness")
                with _server(kind, model, lm.path, rep_store, tmp) as (base, name, startup):
                    run["restart_startup_seconds"] = startup
                    run["restart"] = _stream(_client(base), name, document + "\n\nQuestion: and after a restart?",
                                             max_tokens)
                    tick(f"{kind} restart")
                runs[kind].append(run)
    result = {"mode": "serve", "machine": machine_info(),
              "config": {"model": model, "dtype": lm.dtype, "doc_tokens": pub.entry.num_tokens, "concurrency": list(concurrency), "rounds": rounds,
                         "max_tokens": max_tokens, "repeats": repeats, "long_tokens": long_tokens,
                         "probe_delay": probe_delay, "servers": list(servers)},
              "runs": runs}
    result["summary"] = summarize_serve(result)
    return result


def _span(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def summarize_serve(result: dict) -> dict:
    """Per server and figure: median and range over repeats; the issue's targets as ratios."""
    runs, conc = result["runs"], result["config"]["concurrency"]
    out: dict = {}
    for kind, rs in runs.items():
        s = {"first_ttft": _span([r["first"]["ttft"] for r in rs]),
             "restart_ttft": _span([r["restart"]["ttft"] for r in rs]),
             "startup_seconds": _span([r["startup_seconds"] for r in rs]), "levels": {}}
        for i, c in enumerate(conc):
            lv = [r["levels"][i] for r in rs]
            s["levels"][str(c)] = {"tokens_per_second": _span([x["tokens_per_second"] for x in lv]),
                                   "ttft_p50": _span([x["ttft_p50"] for x in lv]),
                                   "ttft_p95": _span([x["ttft_p95"] for x in lv]),
                                   "errors": sum(len(x["errors"]) for x in lv)}
        if all("fairness" in r for r in rs) and rs:
            s["fairness_short_seconds"] = _span([r["fairness"]["short_seconds"] for r in rs])
            s["fairness_answered"] = all(r["fairness"]["answered"] for r in rs)
        out[kind] = s
    if {"kvmlx", "mlx_lm"} <= set(out):
        k, m = out["kvmlx"], out["mlx_lm"]
        ratios = {}
        for c in map(str, conc):
            kt, mt = k["levels"][c]["tokens_per_second"], m["levels"][c]["tokens_per_second"]
            ratios[c] = {"throughput_ratio": kt["median"] / mt["median"] if kt and mt else None,
                         "throughput_ratio_range": [kt["min"] / mt["max"], kt["max"] / mt["min"]] if kt and mt else None,
                         "ttft_p50_ratio": (m["levels"][c]["ttft_p50"]["median"] / k["levels"][c]["ttft_p50"]["median"]
                                            if k["levels"][c]["ttft_p50"] and m["levels"][c]["ttft_p50"] else None)}
        out["targets"] = {
            "per_concurrency": ratios,
            "throughput_at_least_1x": all(r["throughput_ratio"] and r["throughput_ratio"] >= 1.0 for r in ratios.values()),
            "warm_ttft_p50_not_worse": all(r["ttft_p50_ratio"] and r["ttft_p50_ratio"] >= 1.0 for r in ratios.values()),
            "first_ttft_speedup": (m["first_ttft"]["median"] / k["first_ttft"]["median"]
                                   if k["first_ttft"] and m["first_ttft"] else None),
            "restart_ttft_speedup": (m["restart_ttft"]["median"] / k["restart_ttft"]["median"]
                                     if k["restart_ttft"] and m["restart_ttft"] else None),
        }
        out["targets"]["first_ttft_at_least_10x"] = (out["targets"]["first_ttft_speedup"] or 0) >= 10.0
    return out
