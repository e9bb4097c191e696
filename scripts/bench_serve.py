"""Time to first token through `kvmlx serve`, with and without a hosted KV, at the paper's lengths.

(`kvmlx bench --serve` compares kvmlx serve with mlx_lm.server under concurrent clients.)

    python scripts/bench_serve.py --model builtin:tiny --runs 3 [--lengths 255,485] [--json]

For each length a document is published into a fresh store, the server is started once, and three
kinds of streaming completion request (prompt = document + a 16-token question, max_tokens 1) are
timed to their first token: the first request for the document (the server loads its KV from the
store), later requests (the KV is resident), and the same-length prompt with its first token changed,
which matches nothing and is prefilled from scratch. Medians of --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from kvmlx.measure.bench import DEFAULT_LENGTHS, document_tokens, machine_info, parse_lengths
from kvmlx.models import load_model
from kvmlx.runtime.store import Store


def ttft(client: httpx.Client, url: str, prompt: list[int], model: str) -> tuple[float, int]:
    """Seconds to the first streamed token, and the cached-token count the server reported."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, cached = None, -1
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    lengths = parse_lengths(args.lengths)
    lm = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="kvmlx-serve-bench-") as tmp:
        store = Store(os.path.join(tmp, "store"))
        # a distinct first token per length: otherwise a longer document shares a longer prefix
        docs = {n: [10 + i] + document_tokens(lm.tokenizer, n + 15) for i, n in enumerate(lengths)}
        for n, tokens in docs.items():
            store.publish(lm, tokens[:n])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "kvmlx", "serve", "--model", args.model, "--store", store.root.as_posix(),
             "--port", str(port)], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        rows = []
        try:
            with httpx.Client() as client:
                for _ in range(600):
                    try:
                        client.get(f"{url}/v1/models", timeout=1).raise_for_status()
                        break
                    except httpx.HTTPError:
                        time.sleep(0.2)
                for n, tokens in docs.items():
                    other = [tokens[0] + 100] + tokens[1:]  # matches no stored document
                    first_load, cached = ttft(client, url, tokens, args.model)
                    resident = [ttft(client, url, tokens, args.model)[0] for _ in range(args.runs)]
                    scratch = [ttft(client, url, other, args.model)[0] for _ in range(args.runs)]
                    rows.append({"tokens": n, "cached_tokens": cached, "ttft_first_load_s": first_load,
                                 "ttft_resident_s": statistics.median(resident),
                                 "ttft_prefill_s": statistics.median(scratch),
                                 "speedup_resident": statistics.median(scratch) / statistics.median(resident)})
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {"machine": machine_info(), "model": args.model, "runs": args.runs, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"kvmlx serve, time to first token: {args.model}, median of {args.runs}; prompt = document + 16 tokens")
    print(f"{'tokens':>6} {'cached':>6} {'prefill (no KV)':>16} {'first (load)':>13} {'resident':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['cached_tokens']:>6} {r['ttft_prefill_s'] * 1e3:>13.1f} ms {r['ttft_first_load_s'] * 1e3:>10.1f} ms "
              f"{r['ttft_resident_s'] * 1e3:>6.1f} ms {r['speedup_resident']:>7.1f}x")


if __name__ == "__main__":
    main()
