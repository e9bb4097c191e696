"""The engine's counters (`Engine.stats()`) as Prometheus text exposition, for `/metrics`."""

from __future__ import annotations


def prometheus(stats: dict) -> str:
    """The stats as Prometheus text exposition (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float | None]]) -> None:
        lines.append(f"# HELP kvmlx_{name} {help_}")
        lines.append(f"# TYPE kvmlx_{name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"kvmlx_{name}{{{lab}}} {value}" if lab else f"kvmlx_{name} {value}")

    for name, help_ in [("requests", "Requests received."), ("completed", "Requests completed."),
                        ("cancelled", "Requests stopped early (client disconnected, or a stop string matched)."),
                        ("errors", "Requests failed."), ("rejected", "Requests refused with 429 (queue full)."),
                        ("timeouts", "Requests dropped at their deadline."),
                        ("prompt_tokens", "Prompt tokens."), ("cached_tokens", "Prompt tokens served from published or cached KV."),
                        ("prefilled_tokens", "Prompt tokens prefilled."), ("completion_tokens", "Tokens generated.")]:
        metric(f"{name}_total", "counter", help_, [({}, stats[name])])
    metric("prefill_seconds_total", "counter", "Seconds spent prefilling.", [({}, stats["prefill_seconds"])])
    metric("decode_seconds_total", "counter", "Seconds spent in batched decode steps.", [({}, stats["decode_seconds"])])
    metric("active_requests", "gauge", "Requests in progress.", [({}, stats["active_requests"])])
    metric("queued_requests", "gauge", "Requests waiting or prefilling.", [({}, stats["queued_requests"])])
    metric("decoding_requests", "gauge", "Requests in the decode batch.", [({}, stats["decoding_requests"])])
    metric("resident_bytes", "gauge", "Bytes of published KV held in memory.", [({}, stats["resident_bytes"])])
    metric("cached_tokens_by_tier_total", "counter", "Prompt tokens reused, by where their KV came from.",
           [({"tier": t}, n) for t, n in stats["cached_tokens_by_tier"].items()])
    pc = stats["prefix_cache"]
    if "off" not in pc:
        for name, help_ in [("records_written", "Prefix-cache records written."),
                            ("bytes_written", "Bytes of prefix-cache records written to disk."),
                            ("tokens_written", "Tokens whose KV the prefix cache wrote."),
                            ("quarantined", "Prefix-cache records that failed their checks."),
                            ("write_errors", "Prefix-cache writes that failed.")]:
            metric(f"prefix_cache_{name}_total", "counter", help_, [({}, pc[name])])
        metric("prefix_cache_evictions_total", "counter", "Prefix-cache records evicted, by tier.",
               [({"tier": t}, n) for t, n in pc["evictions"].items()])
        metric("prefix_cache_bytes", "gauge", "Bytes the prefix cache holds, by tier.",
               [({"tier": "memory"}, pc["ram_bytes"]), ({"tier": "disk"}, pc["disk_bytes"])])
        metric("prefix_cache_budget_bytes", "gauge", "The prefix cache's budgets, by tier.",
               [({"tier": "memory"}, pc["ram_budget_bytes"]), ({"tier": "disk"}, pc["disk_budget_bytes"])])
    from ..runtime.blend import METRICS as BLEND_METRICS

    words = ("Requests served with blend.", "Blended requests whose result is approximate.",
             "Prompt tokens reused by blend at new positions.", "Reused tokens blend recomputed.",
             "Prompt tokens blend computed.")
    for name, help_ in zip(BLEND_METRICS, words):
        metric(name.removeprefix("kvmlx_"), "counter", help_, [({}, stats.get("blend", {}).get(name, 0))])
    docs = stats["documents"]
    lab = [{"key": d["key"]} for d in docs]
    metric("document_loads_total", "counter", "Loads of a published document.", [(l, d["loads"]) for l, d in zip(lab, docs)])
    metric("document_requests_total", "counter", "Requests reusing a published document.",
           [(l, d["requests"]) for l, d in zip(lab, docs)])
    metric("document_tokens_saved_total", "counter", "Prompt tokens not prefilled thanks to a published document.",
           [(l, d["tokens_saved"]) for l, d in zip(lab, docs)])
    metric("document_compute_seconds_saved", "gauge", "Prefill seconds saved (estimated from measured prefill speed).",
           [(l, d["compute_seconds_saved"]) for l, d in zip(lab, docs)])
    metric("document_resident", "gauge", "1 while the document's KV is in memory.",
           [(l, int(d["resident"])) for l, d in zip(lab, docs)])
    return "\n".join(lines) + "\n"
