"""The parallel layout of an artifact: which process of a distributed run (`mlx.launch`) holds which
KV heads and layers, as the header's `parallel` object records it, and the check that refuses a load
under any other layout.

KV computed under one sharding is not the KV of another (sharded matmuls reduce in another order:
logits differ by up to 0.26 at tensor-parallel 2 on builtin:small), so the layout is part of an
artifact's identity, like the model fingerprint. A parallel artifact is a *manifest* (a kvmlx file
with no tensors whose `parallel.parts` lists every rank's part file and that file's header digest)
plus one *part* per rank (a kvmlx file with `parallel.part` = its rank, holding only that rank's KV
heads or layers, each tensor with its own digest). docs/FORMAT.md, "Parallel artifacts", has the
fields. This module validates the object (no model, no I/O) and describes layouts in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ArtifactError, LayoutMismatchError

MAX_RANKS = 4096
PART_FILE_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")  # a plain file name beside the manifest: no path, no ..
SINGLE = "one process (unsharded)"


@dataclass(frozen=True)
class RankPart:
    """One rank's share: KV heads [heads[0], heads[1]) of layers [layers[0], layers[1])."""

    rank: int
    kv_heads: tuple[int, int]
    layers: tuple[int, int]

    def to_json(self) -> dict:
        return {"rank": self.rank, "kv_heads": list(self.kv_heads), "layers": list(self.layers)}


@dataclass(frozen=True)
class Layout:
    """How a model's KV is split over the ranks of a group (tensor parallel splits heads, pipeline layers)."""

    tensor_parallel: int
    pipeline_stages: int
    ranks: tuple[RankPart, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    def part(self, rank: int) -> RankPart:
        return self.ranks[rank]

    def to_json(self) -> dict:
        return {"tensor_parallel": self.tensor_parallel, "pipeline_stages": self.pipeline_stages,
                "ranks": [r.to_json() for r in self.ranks]}

    def describe(self) -> str:
        if self.tensor_parallel > 1:
            each = "; ".join(f"rank {r.rank}: KV heads {_span(r.kv_heads)}" for r in self.ranks)
            return f"tensor-parallel {self.tensor_parallel} ({each})"
        each = "; ".join(f"rank {r.rank}: layers {_span(r.layers)}" for r in self.ranks)
        return f"{self.pipeline_stages} pipeline stages ({each})"


def _span(r: tuple[int, int]) -> str:
    return f"{r[0]}" if r[1] - r[0] == 1 else f"{r[0]}-{r[1] - 1}"


def tensor_layout(size: int, num_layers: int, num_kv_heads: int) -> Layout:
    """Tensor parallel over `size` ranks: rank r holds KV heads [r*H/size, (r+1)*H/size) of every layer
    (mlx-lm's `shard_linear` splits the K and V projections' outputs evenly, in rank order)."""
    per = num_kv_heads // size
    return Layout(size, 1, tuple(RankPart(r, (r * per, (r + 1) * per), (0, num_layers)) for r in range(size)))


def pipeline_layout(size: int, num_layers: int, num_kv_heads: int) -> Layout:
    """Pipeline over `size` stages as mlx-lm's `PipelineMixin.pipeline` splits by default: the low ranks
    get the extra layers, and rank r runs the layers after those of ranks r+1 ... size-1 (rank 0 the last)."""
    base, extra = divmod(num_layers, size)
    split = [base + (1 if r < extra else 0) for r in range(size)]
    parts = []
    for r in range(size):
        start = sum(split[r + 1 :])
        parts.append(RankPart(r, (0, num_kv_heads), (start, start + split[r])))
    return Layout(1, size, tuple(parts))


def header_layout(header: dict) -> Layout | None:
    """The layout a (validated) header records, or None for an artifact of one process."""
    p = header.get("parallel")
    if p is None:
        return None
    ranks = tuple(RankPart(r["rank"], tuple(r["kv_heads"]), tuple(r["layers"])) for r in p["ranks"])
    return Layout(p["tensor_parallel"], p["pipeline_stages"], ranks)


def describe(layout: Layout | None) -> str:
    return SINGLE if layout is None else layout.describe()


def check_layout(header: dict, running: Layout | None, *, rank: int = 0) -> None:
    """Refuse a load under another layout than the artifact's, naming both (fail closed)."""
    stored = header_layout(header)
    if stored != running:
        raise LayoutMismatchError(
            f"artifact was published under {describe(stored)} but this run is {describe(running)}; "
            "load it under the same layout (or publish again under this one)"
        )
    p = header.get("parallel")
    if p is not None and "part" in p:
        raise LayoutMismatchError(f"this file is rank {p['part']}'s part of a parallel artifact; load its manifest instead")


def kv_plan(h: dict, name: str) -> tuple[tuple[int, int], int, bool]:
    """(layers [start, end), KV heads per tensor, whether a logits row is stored) for a header's tensors.

    A plain artifact: every layer, every head, logits. A part: its rank's layers and heads, logits.
    A manifest: no tensors at all. Also validates the `parallel` object (ArtifactError on anything off).
    """
    model = h["model"]
    layers, heads = model["num_layers"], model["num_kv_heads"]
    if "parallel" not in h:
        return (0, layers), heads, True
    layout = _validate(h["parallel"], layers, heads, name)
    p = h["parallel"]
    if "parts" in p:
        return (0, 0), heads, False
    mine = layout.part(p["part"])
    return mine.layers, mine.kv_heads[1] - mine.kv_heads[0], True


def _require(cond: bool, name: str, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{name}: invalid header: parallel: {what}")


def _int(x, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi


def _range(x, hi: int) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_int(v, 0, hi) for v in x) and x[0] < x[1]


def _validate(p, num_layers: int, num_heads: int, name: str) -> Layout:
    _require(isinstance(p, dict), name, "not an object")
    known = {"tensor_parallel", "pipeline_stages", "ranks", "part", "parts"}
    _require(set(p) <= known, name, f"unknown fields {sorted(set(p) - known)}")
    tp, pp, ranks = p.get("tensor_parallel"), p.get("pipeline_stages"), p.get("ranks")
    _require(_int(tp, 1, MAX_RANKS) and _int(pp, 1, MAX_RANKS), name, "tensor_parallel and pipeline_stages must be positive")
    _require((tp == 1) != (pp == 1), name, "exactly one of tensor_parallel and pipeline_stages must exceed 1")
    _require(isinstance(ranks, list) and len(ranks) == tp * pp, name, f"{tp * pp} ranks expected")
    for i, r in enumerate(ranks):
        _require(isinstance(r, dict) and set(r) == {"rank", "kv_heads", "layers"} and r["rank"] == i, name, f"rank {i} is malformed")
        _require(_range(r["kv_heads"], num_heads) and _range(r["layers"], num_layers), name, f"rank {i}'s ranges are out of bounds")
    layout = header_layout({"parallel": p})
    expected = (tensor_layout if tp > 1 else pipeline_layout)(tp * pp, num_layers, num_heads)
    _require(layout == expected, name, f"the ranks do not split {num_layers} layers x {num_heads} KV heads as mlx-lm shards them")
    _require(("part" in p) != ("parts" in p), name, "exactly one of part (a rank's file) and parts (the manifest)")
    if "part" in p:
        _require(_int(p["part"], 0, len(ranks) - 1), name, "part is not a rank")
        return layout
    parts = p["parts"]
    _require(isinstance(parts, list) and len(parts) == len(ranks), name, "one part per rank expected")
    for i, e in enumerate(parts):
        _require(isinstance(e, dict) and set(e) == {"rank", "file", "header_blake3", "file_bytes"} and e["rank"] == i,
                 name, f"part {i} is malformed")
        _require(isinstance(e["file"], str) and bool(PART_FILE_RE.match(e["file"])) and e["file"] not in (".", ".."),
                 name, f"part {i}'s file must be a plain file name")
        d = e["header_blake3"]
        _require(isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d), name, f"part {i}'s digest is malformed")
        _require(_int(e["file_bytes"], 1, 1 << 50), name, f"part {i}'s size is out of range")
    return layout
