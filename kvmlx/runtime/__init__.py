"""The runtime paths: publish (document -> prefill -> artifact), load (artifact -> mlx-lm caches),
generate and verify (continue from loaded KV, compare with prefill), the agent (automatic
longest-prefix reuse) and the local store it reuses from. Imports `artifact/`, `caches/` and
`models.py`; never `serving/`, `measure/` or `cli/`.
"""
