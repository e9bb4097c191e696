"""KV tensor encodings: raw, lossy quantisation (the paper's int8 probe, MLX group-wise 8/4-bit) and
lossless byte-plane splitting + zstd that decodes bit-exactly.

Every encoder takes an evaluated [1, H, L, D] MLX array and returns (blob bytes, params); every
decoder returns the decoded tensor's raw bytes (numpy uint8, C order). `kvmlx.artifact.format` only knows the
names and whether each is lossless; this module does the arithmetic.

Lossless designs (16-bit dtypes; float32 falls back to 4 byte planes):
- ``bytesplit-zstd``: high bytes and low bytes of each 16-bit value as two planes, each zstd-compressed.
  The high byte (sign and most of the exponent) is low-entropy; the low byte mostly mantissa.
- ``expsplit-zstd``: rotate each 16-bit value left by one bit first, moving the (random) sign bit
  to the bottom: in bfloat16 the high plane is then exactly the 8-bit exponent, in float16 the 5-bit
  exponent and the top of the mantissa. The exponent plane has no random bit mixed in, so the
  entropy coder gets nearer to the exponent's entropy; decoding stays two cheap passes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import zstandard

from ..errors import ArtifactError

ZSTD_LEVEL = 1  # level 1 compressed KV planes as well as 3 here, twice as fast
_MLX_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def encode(x: mx.array, encoding: str) -> tuple[bytes, dict]:
    """Encode one evaluated KV tensor; returns the stored bytes and the params the decoder needs."""
    dtype = str(x.dtype).split(".")[-1]
    if encoding == "int8-tensor":
        scale = float(mx.max(mx.abs(x.astype(mx.float32))).item()) / 127.0 or 1.0
        q = mx.clip(mx.round(x.astype(mx.float32) / scale), -127, 127).astype(mx.int8)
        return _bytes(q), {"scale": scale}
    if encoding in ("q8", "q4"):
        bits = 8 if encoding == "q8" else 4
        group = min(64, x.shape[-1])
        wq, scales, biases = mx.quantize(x, group_size=group, bits=bits)
        return _bytes(wq) + _bytes(scales) + _bytes(biases), {"group_size": group, "bits": bits}
    if encoding in ("bytesplit-zstd", "expsplit-zstd"):
        planes = _planes(np.frombuffer(_bytes(x), dtype=np.uint8), dtype, encoding)
        frames = [zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(p.tobytes()) for p in planes]
        return b"".join(frames), {"frames": [len(f) for f in frames]}
    raise ArtifactError(f"unknown encoding {encoding!r}")


def decode(blob: memoryview, encoding: str, params: dict, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode one tensor to its raw bytes; refuses anything that does not decode to exactly `shape`."""
    n = int(np.prod(shape))
    try:
        if encoding == "int8-tensor":
            q = mx.array(np.frombuffer(blob, dtype=np.int8, count=n)).reshape(shape)
            return _raw((q.astype(mx.float32) * float(params["scale"])).astype(_MLX_DTYPES[dtype]))
        if encoding in ("q8", "q4"):
            return _raw(_dequantize(blob, params, dtype, shape))
        if encoding in ("bytesplit-zstd", "expsplit-zstd"):
            sizes = [int(s) for s in params["frames"]]
            if sum(sizes) != len(blob) or any(s < 1 for s in sizes):
                raise ValueError("frame sizes do not add up to the stored bytes")
            plane_size = n  # every plane holds one byte per element
            if len(sizes) != len(_planes(np.zeros(_ITEMSIZE[dtype], np.uint8), dtype, encoding)):
                raise ValueError("wrong number of planes")
            planes, at = [], 0
            for s in sizes:
                if zstandard.frame_content_size(bytes(blob[at : at + min(s, 18)])) not in (-1, plane_size):
                    raise ValueError("a plane declares the wrong decoded size")
                d = zstandard.ZstdDecompressor().decompress(bytes(blob[at : at + s]), max_output_size=plane_size)
                if len(d) != plane_size:
                    raise ValueError("a plane decoded to the wrong size")
                planes.append(np.frombuffer(d, dtype=np.uint8))
                at += s
            return _join(planes, dtype, encoding)
    except (ValueError, KeyError, TypeError, OverflowError, ZeroDivisionError, zstandard.ZstdError) as e:
        raise ArtifactError(f"cannot decode a {encoding} tensor: {e}") from None
    raise ArtifactError(f"unknown encoding {encoding!r}")


def _bytes(x: mx.array) -> bytes:
    x = mx.contiguous(x)
    mx.eval(x)
    return bytes(memoryview(x).cast("B"))


def _raw(x: mx.array) -> np.ndarray:
    return np.frombuffer(_bytes(x), dtype=np.uint8)


def _dequantize(blob: memoryview, params: dict, dtype: str, shape: tuple[int, ...]) -> mx.array:
    group, bits = int(params["group_size"]), int(params["bits"])
    if bits not in (4, 8) or group < 1 or shape[-1] % group:
        raise ValueError("bad quantisation parameters")
    rows = int(np.prod(shape[:-1]))
    wq_n = rows * shape[-1] * bits // 32
    sb_n = rows * shape[-1] // group
    item = _ITEMSIZE[dtype]
    if len(blob) != wq_n * 4 + 2 * sb_n * item:
        raise ValueError("stored size does not match the quantised shape")
    wq = mx.array(np.frombuffer(blob, dtype=np.uint32, count=wq_n)).reshape(*shape[:-1], -1)
    side = np.frombuffer(blob, dtype=np.uint8, offset=wq_n * 4)
    scales = mx.array(side[: sb_n * item]).view(_MLX_DTYPES[dtype]).reshape(*shape[:-1], -1)
    biases = mx.array(side[sb_n * item :]).view(_MLX_DTYPES[dtype]).reshape(*shape[:-1], -1)
    return mx.dequantize(wq, scales, biases, group_size=group, bits=bits)


def _planes(raw: np.ndarray, dtype: str, encoding: str) -> list[np.ndarray]:
    width = _ITEMSIZE[dtype]
    if encoding == "expsplit-zstd" and width == 2:
        u = raw.view(np.uint16)
        raw = ((u << 1) | (u >> 15)).view(np.uint8)  # rotate left: sign bit to the bottom
    return [np.ascontiguousarray(raw.reshape(-1, width)[:, i]) for i in range(width)]


def _join(planes: list[np.ndarray], dtype: str, encoding: str) -> np.ndarray:
    raw = np.stack(planes, axis=1).reshape(-1)
    if encoding == "expsplit-zstd" and _ITEMSIZE[dtype] == 2:
        u = raw.view(np.uint16)
        raw = ((u >> 1) | (u << 15)).view(np.uint8)  # rotate back
    return raw
