"""A Q8_0 GGUF table kept 8-bit on the CPU: the LM head through torch's int4 kernel, and, when the head is tied
to the embedding, the embedding's rows from the same bytes.

Q8_0 stores w = d * q per 32 weights, q an int8 and d a float16. Each q is two 4-bit halves,
q = 16 * (q >> 4) + (q & 15) with (q >> 4) in -8..7 and (q & 15) in 0..15, so a row of K weights is exactly a row
of 2K int4 values in 32-weight groups, the high halves first, then the low ones:

    w[k] = (hi[k] - 8) * 16 d  +  ((lo[k] - 8) * d + 8 d)        hi = (q >> 4) + 8, lo = q & 15
           scale 16 d, zero 0     scale d, zero 8 d

and x . w = [x, x] . [hi, lo]: one torch._weight_int4pack_mm_for_cpu call over 2K inputs (the layout and kernel
of serval.layers.quant.gguf). It reads 1.25 bytes a weight (one byte of nibbles, a quarter byte of bfloat16 scale
and zero) instead of float32's 4: the default model's tied 49152 x 576 head reads 35 MB a token instead of 113.
The kernel rounds d to bfloat16 (16 d and 8 d round alike: powers of two), takes bfloat16 activations and
returns bfloat16 logits; it accumulates in float32. The largest logits of each row, the ones greedy and sampling
choose among, are then computed again in float32 from the exact rows.

The embedding's rows are read back from the packed nibbles and the float16 d (`q8_scales`), exactly the float32
values the dequantizer gives, so one copy of the table serves both ends of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from serval.layers.quant.base import QuantMethod, check_loaded, mark_loaded
from serval.layers.quant.gguf import KERNEL_DTYPE, bfloat16_from_numpy, pack_int4_for_cpu, pack_int4_rows
from serval.layers.quant.gguf_blocks import GROUP_SIZE, Q

# Whole blocks of pack_int4_for_cpu's layout on any CPU (64 rows with AVX-512, 32 with AVX2), which embed() reads
# rows from.
PACK_ROWS = 64
# The logits of each row recomputed in float32 after the kernel (apply). The kernel's error is ~0.06, so the
# float32 head's top choices are among its top few; each refined row costs a row lookup (64 took 0.2-0.5 ms a
# step at batch 1, and ~17 ms at 16 rows, on the loaded 2-core VM; 8 took 0.06 and ~2).
REFINED_LOGITS = 8


def fits_q8_head(rows: int, columns: int) -> bool:
    """Whether a [rows, columns] Q8_0 table fits this format: whole 32-weight groups, whole 64-row blocks, and a
    packed layout this process's torch is known to write (embed reads rows out of it)."""
    return columns % GROUP_SIZE == 0 and rows % PACK_ROWS == 0 and pack_int4_rows() is not None


@dataclass(frozen=True)
class GGUFQ8HeadMethod(QuantMethod):
    """A Q8_0 LM head (and the embedding tied to it) kept 8-bit, on the CPU."""

    name = "gguf Q8_0"
    routed_tensors = ("gguf_blocks",)
    serves_embedding = True

    def create_weights(self, layer) -> None:
        n, k = layer.out_features, layer.in_features
        if layer.weight.device.type != "cpu":
            raise ValueError(f"{self.name}: the packed head runs on the CPU only; this layer is on "
                             f"{layer.weight.device}")
        if not fits_q8_head(n, k) or layer.bias is not None:
            raise ValueError(f"{self.name}: a {n} x {k} layer does not fit the packed head (no bias, inputs in "
                             f"whole {GROUP_SIZE}-weight groups, outputs in whole {PACK_ROWS}-row blocks)")
        layer.register_parameter("weight", None)  # the checkpoint has no float weight for this layer

    def load(self, layer, shard: str | None, suffix: str, tensor: torch.Tensor, hf_name: str) -> None:
        n, k = layer.out_features, layer.in_features
        block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_0][1]
        blocks = tensor.numpy().view(np.uint8).reshape(-1, block_bytes)
        if shard is not None or len(blocks) != n * (k // GROUP_SIZE):
            raise ValueError(f"{self.name}: {hf_name!r} holds {len(blocks)} blocks; the layer expects "
                             f"{n * (k // GROUP_SIZE)} ({n} x {k})")
        scales = blocks[:, :2].copy().view(np.float16).reshape(n, k // GROUP_SIZE)
        q = blocks[:, 2:].view(np.int8).reshape(n, k)
        halves = np.concatenate(((q >> 4) + 8, q & 15), axis=1).astype(np.uint8)  # [N, 2K] in 0..15
        d = scales.astype(np.float32).T  # [K / 32, N]
        scales_and_zeros = np.empty((2 * (k // GROUP_SIZE), n, 2), dtype=np.float32)
        scales_and_zeros[:k // GROUP_SIZE, :, 0] = 16 * d
        scales_and_zeros[:k // GROUP_SIZE, :, 1] = 0
        scales_and_zeros[k // GROUP_SIZE:, :, 0] = d
        scales_and_zeros[k // GROUP_SIZE:, :, 1] = 8 * d
        layer.register_buffer("qweight", pack_int4_for_cpu(halves))
        layer.register_buffer("scales_and_zeros", bfloat16_from_numpy(scales_and_zeros))
        layer.register_buffer("q8_scales", torch.from_numpy(scales))
        mark_loaded(layer, shard, suffix)

    def finish(self, layer, layer_name: str) -> None:
        check_loaded(layer, layer_name, self.name, self.routed_tensors)

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        if gated:
            raise ValueError(f"{self.name}: the packed head is not a gated projection")
        rows = x.reshape(-1, x.shape[-1])
        half = rows.to(KERNEL_DTYPE)
        y = torch._weight_int4pack_mm_for_cpu(torch.cat((half, half), dim=-1), layer.qweight, GROUP_SIZE,
                                              layer.scales_and_zeros).to(x.dtype)
        # The kernel's logits carry bfloat16 rounding (~0.06 at a logit of 20), enough to flip near ties that the
        # float32 head would not. Each row's REFINED_LOGITS largest, those greedy and sampling choose among, are
        # computed again in float32 from the exact rows.
        top = y.topk(min(REFINED_LOGITS, layer.out_features), dim=-1).indices  # [M, R]
        exact = torch.bmm(self.embed(layer, top, torch.float32), rows.float().unsqueeze(-1)).squeeze(-1)
        y.scatter_(-1, top, exact.to(y.dtype))
        return y.view(*x.shape[:-1], layer.out_features)

    def embed(self, layer, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the table, [*ids.shape, K] in dtype: float32 d * q, as the dequantizer computes them."""
        n, k = layer.out_features, layer.in_features
        flat = ids.reshape(-1).long()
        # pack_int4_for_cpu's layout: B-row blocks of [2K][B / 2] bytes, row j's nibble low, row j + B / 2's high.
        block = pack_int4_rows()
        packed = layer.qweight.view(n // block, 2 * k, block // 2)[flat // block, :, flat % (block // 2)]
        shift = torch.where(flat % block >= block // 2, 4, 0).unsqueeze(-1)
        halves = (packed.int() >> shift) & 15  # [T, 2K]
        q = (halves[:, :k] - 8) * 16 + halves[:, k:]
        rows = q.float().view(-1, k // GROUP_SIZE, GROUP_SIZE) * layer.q8_scales[flat].float().unsqueeze(-1)
        return rows.to(dtype).view(*ids.shape, k)
