"""Measuring: `kvmlx bench` (load vs prefill vs mlx-lm, the shape and compression studies, the
machine and its roofline, tables and plots), `kvmlx cost` (the paper's economics) and the spot
check that recomputes stored KV. Built on `runtime/`; nothing below imports it.
"""
