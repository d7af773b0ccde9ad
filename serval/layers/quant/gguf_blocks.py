"""GGUF's block layouts in numpy: dequantize any supported type to float32, or split a 4-bit one (Q4_0, Q4_1, Q4_K)
into its 4-bit values and one scale and zero per 32 weights, the form torch's int4 CPU kernel takes:

    Q4_0  w = d * (q - 8)                       scale d,        zero 0
    Q4_1  w = d * q + m                         scale d,        zero m + 8d
    Q4_K  w = d * sc_j * q - dmin * mn_j        scale d * sc_j, zero 8 d sc_j - dmin mn_j   (j: 32-weight sub-block)

so that w = (q - 8) * scale + zero in every case, the same number the dequantizer gives.

In numpy, not torch: numpy runs single-threaded, while torch's OpenMP threads spin at a barrier after each of the
~1,000 small ops a load makes. On this 2-core CPU shared with another torch process that made loading SmolLM2
take 6-10 s instead of 0.3 s (measured); numpy takes ~0.3 s either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
GROUP_SIZE = 32  # weights per scale/zero in the int4 form



def dequantize(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, shape) -> torch.Tensor:
    """The float32 tensor of `shape` (HF order, rows first) that the GGUF data `raw` encodes."""
    qtype = Q(qtype)
    shape = tuple(int(d) for d in shape)
    if qtype in (Q.F32, Q.F16, Q.F64):
        return torch.from_numpy(np.array(raw, dtype=np.float32).reshape(shape))
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if qtype == Q.BF16:
        values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype in _DEQUANTIZERS:
        values = _DEQUANTIZERS[qtype](data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1]))
    else:
        try:
            values = gguf.quants.dequantize(data, qtype)
        except NotImplementedError as error:
            raise ValueError(f"GGUF tensor type {qtype.name} is not supported; supported: F32, F16, BF16, "
                             f"{', '.join(t.name for t in _DEQUANTIZERS)} and what gguf.quants dequantizes") from error
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of each block, as a float32 column."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2n): low nibbles first, then high nibbles (ggml's order within a 32-group)."""
    out = np.empty((*packed.shape[:-1], 2, packed.shape[-1]), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[..., 0, :])
    np.right_shift(packed, 4, out=out[..., 1, :])
    return out.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    values *= _f16(blocks, 0)
    return values


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    values = _nibbles(blocks[:, 2:]).astype(np.float32)
    values -= 8
    values *= _f16(blocks, 0)
    return values


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    values = _nibbles(blocks[:, 4:]).astype(np.float32)
    values *= _f16(blocks, 0)
    values += _f16(blocks, 2)
    return values


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (_f16(blocks, 0) * sc)[..., None] * q - (_f16(blocks, 2) * mn)[..., None]


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    low = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (low | (high << 4)).astype(np.float32)
    return (_f16(blocks, 0) * sc)[..., None] * q - (_f16(blocks, 2) * mn)[..., None]


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    scale = (_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64))  # (n, 2 halves, 128): 4 groups of 32 per half
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 2, 128)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return scale * q.reshape(n, 16, 16).astype(np.float32)


_DEQUANTIZERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)


@dataclass
class Int4Blocks:
    """A 4-bit GGUF tensor [rows, K] as values q in 0..15 and, per 32 weights, w = (q - 8) * scale + zero."""
    values: np.ndarray  # uint8 [rows, K]
    scales: np.ndarray  # float32 [rows, K / 32]
    zeros: np.ndarray  # float32 [rows, K / 32]


def int4_blocks(raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> Int4Blocks:
    """The rows of raw GGUF data (uint8 [rows, bytes per row]) of a type in INT4_TYPES, as int4 values and groups."""
    qtype = Q(qtype)
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    if qtype == Q.Q4_0:
        values, scales = _nibbles(blocks[:, 2:]), _f16(blocks, 0)
        zeros = np.zeros_like(scales)
    elif qtype == Q.Q4_1:
        values, scales = _nibbles(blocks[:, 4:]), _f16(blocks, 0)
        zeros = _f16(blocks, 2) + 8 * scales
    elif qtype == Q.Q4_K:
        n = blocks.shape[0]
        sc, mn = _k_scales(blocks[:, 4:16])
        values = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n * 8, 32)
        scales = (_f16(blocks, 0) * sc).reshape(-1, 1)
        zeros = 8 * scales - (_f16(blocks, 2) * mn).reshape(-1, 1)
    else:
        raise ValueError(f"GGUF type {qtype.name} is not a 4-bit type with 32-weight groups; those are "
                         f"{[t.name for t in INT4_TYPES]}")
    return Int4Blocks(values.reshape(rows, -1), scales.reshape(rows, -1), zeros.reshape(rows, -1))
