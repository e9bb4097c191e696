"""The load path's destination buffers: evaluated MLX arrays for the reads to fill, made as cheaply
as MLX allows (`destinations`): from host zeros with no `mx.eval` for a small load, zero-filled by
one `mx.eval`, or straight from MLX's allocator through `mx.load` (`_BlankTensors`) for large ones."""

from __future__ import annotations

import json
import math
import struct
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..artifact.envelope import ST_DTYPES
from ..artifact.format import TENSOR_DTYPES

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32, "uint32": mx.uint32}
# numpy's type for building each dtype's zeros on the host (bfloat16: float32 zeros, converted as MLX copies them)
HOST_ZEROS = {"float16": np.float16, "bfloat16": np.float32, "float32": np.float32, "uint32": np.uint32}
SMALL_BUFFER = 4 << 20  # bytes: below this, zero-filling a buffer is cheaper than `mx.load`'s hand-off
HOST_BUILT = 1 << 20  # bytes: destinations this small are built from host zeros, without an `mx.eval` (~50 us)


def uninitialized(shapes: Sequence[tuple[int, ...]], dtype: str) -> list[mx.array]:
    """Evaluated MLX buffers of `shapes` with arbitrary contents (`destinations` says more)."""
    return destinations(shapes, dtype)[0]


def destinations(shapes: Sequence[tuple[int, ...]], dtypes: str | Sequence[str]) -> tuple[list[mx.array], bool]:
    """Evaluated MLX buffers with arbitrary contents, for the caller to overwrite entirely; `dtypes`:
    one for all, or one per shape.

    MLX has no uninitialised allocation, and filling costs as much as the load itself (`mx.zeros`
    writes every byte: ~45 ms for 557 MB here, more on fresh pages). `mx.load` is the one MLX op that
    allocates without writing: it hands each new buffer to the reader to fill. `_BlankTensors` is a
    reader that leaves them as they are, so the buffers come straight from MLX's cache (already
    touched after the first load) and our `preadv` is the only pass over their bytes (with the
    zeroing of the spare slots, `_copy_heads`: ~6% of them). Each buffer
    costs `mx.load` a hand-off to its I/O thread (~0.2 ms here), more than filling a small one, so
    buffers under `SMALL_BUFFER` on average are filled instead (one `mx.eval` for all: each costs
    ~50 us, a fifth of a small load); so are all if `mx.load` ever fails. Under `HOST_BUILT` bytes in
    all they are made from host zeros (`mx.array` copies them at once: no eval at all). The flag says
    whether they were zero-filled (then nothing needs zeroing again).
    """
    kinds = [dtypes] * len(shapes) if isinstance(dtypes, str) else list(dtypes)
    sizes = [math.prod(shape) * TENSOR_DTYPES[dtype] for shape, dtype in zip(shapes, kinds)]
    if sum(sizes) >= len(shapes) * SMALL_BUFFER:
        try:
            arrays = mx.load(_BlankTensors(shapes, kinds), format="safetensors", stream=mx.cpu)
            return [arrays[str(i)] for i in range(len(shapes))], False
        except Exception:  # noqa: BLE001 - any failure of the fast path just costs a fill
            pass
    if sum(sizes) <= HOST_BUILT:
        return [mx.array(np.zeros(shape, HOST_ZEROS[dtype]), dtype=DTYPES[dtype]) for shape, dtype in zip(shapes, kinds)], True
    out = [mx.zeros(shape, DTYPES[dtype]) for shape, dtype in zip(shapes, kinds)]
    mx.eval(out)
    return out, True


class _BlankTensors:
    """A read-only file object holding a safetensors header for `shapes` and no data: reads of the
    data region return without writing, which leaves `mx.load`'s fresh buffers uninitialised."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]):
        entries, end = {}, 0
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
            nbytes = int(np.prod(shape)) * TENSOR_DTYPES[dtype]
            entries[str(i)] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [end, end + nbytes]}
            end += nbytes
        body = json.dumps(entries).encode()
        body += b" " * (-len(body) % 8)
        self._head = struct.pack("<Q", len(body)) + body
        self._size = len(self._head) + end
        self._pos = 0
        self.closed = False

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (0, self._pos, self._size)[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: memoryview) -> int:
        n = memoryview(buffer).nbytes
        if self._pos < len(self._head):
            memoryview(buffer).cast("B")[:] = self._head[self._pos : self._pos + n]
        self._pos += n
        return n
