"""Every kernel one decoder layer of a mixture-of-experts model launches in a batch-1 decode step: the torch ops
that launch one (logged by a TorchDispatchMode; views and allocations left out) and the Triton kernels (logged at
launch), in order, with a count per name. Batch-1 decode of a MoE is a few big GEMVs and many tiny kernels, each
a few microseconds of dependent latency however small (docs/models.md, "MoE decode: kernels a layer"): this list
is what to fuse next.

    python benchmarks/moe_layer_kernels.py --model benchmarks/configs/qwen3-30b-a3b --out $OUT/layer_kernels.json
    python benchmarks/moe_layer_kernels.py --tiny --device cpu     # the same shape of model, scaled down

On a GPU the model is the config's with two layers (the list is the second's: the residual path of every layer
after the first). On CPU the Triton kernels run in Triton's interpreter where the engine would take them on a GPU
(SERVAL_MOE_BACKEND, SERVAL_ATTENTION_BACKEND and SERVAL_GEMV set to triton); the norms pick their Triton kernel
by the device alone, so on CPU they show as their torch math.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import asdict, dataclass

TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 16,
        "num_experts_per_tok": 4, "moe_intermediate_size": 32, "intermediate_size": 96, "vocab_size": 256}
# Ops that launch no kernel: views, allocations, metadata.
NO_KERNEL = {"view", "_unsafe_view", "empty", "empty_strided", "empty_like", "t", "transpose", "slice", "select",
             "split", "split_with_sizes", "as_strided", "alias", "detach", "expand", "unsqueeze", "squeeze",
             "permute", "unflatten", "reshape", "lift_fresh", "_reshape_alias", "unbind", "narrow"}


@dataclass
class LayerKernels:
    model: str
    device: str
    launches: list[str]  # in order: "aten.<op>" or "triton.<kernel>"
    counts: dict[str, int]
    total: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/qwen3-30b-a3b", help="a directory with config.json")
    parser.add_argument("--tiny", action="store_true", help="scale the config down (hidden 64, 16 experts, top-4)")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="a directory for layer_kernels.json")
    args = parser.parse_args()
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        for name in ("SERVAL_MOE_BACKEND", "SERVAL_ATTENTION_BACKEND", "SERVAL_GEMV"):
            os.environ.setdefault(name, "triton")
    result = layer_kernels(args.model, args.tiny, device)
    width = max(len(name) for name in result.counts)
    print(f"{result.model} on {result.device}: {result.total} kernels in one decoder layer's batch-1 decode step")
    for name, count in sorted(result.counts.items(), key=lambda item: -item[1]):
        print(f"  {name:<{width}}  {count}")
    print("in order: " + ", ".join(result.launches))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "layer_kernels.json"), "w") as f:
            json.dump(asdict(result), f, indent=1)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def layer_kernels(model_dir: str, tiny: bool, device: str) -> LayerKernels:
    import torch
    import transformers

    from serval.layers.attention import AttentionMetadata
    from serval.model.registry import get_model_class

    config = transformers.AutoConfig.from_pretrained(model_dir)
    for key, value in (TINY if tiny else {}).items():
        setattr(config, key, value)
    config.num_hidden_layers = 2
    model = get_model_class(config)(config).to(device, torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, device=device) * 0.02)
    layer = model.model.layers[1]
    block_size, num_blocks = 16, 4
    head_dim = layer.self_attn.head_dim
    kv_cache = torch.zeros(2, num_blocks, block_size, config.num_key_value_heads, head_dim, dtype=torch.bfloat16,
                           device=device)
    context = 40
    metadata = AttentionMetadata(slot_mapping=torch.tensor([context - 1], device=device), query_start_loc=[0, 1],
                                 seq_lens=[context], block_size=block_size,
                                 block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None])
    positions = torch.tensor([context - 1], device=device)
    hidden = torch.randn(1, config.hidden_size, generator=generator, device=device).to(torch.bfloat16)
    residual = torch.randn(1, config.hidden_size, generator=generator, device=device).to(torch.bfloat16)
    with torch.no_grad():
        layer(positions, hidden, residual, kv_cache, metadata)  # compiles the kernels, picks the backends
        with _LaunchLog() as log:
            layer(positions, hidden, residual, kv_cache, metadata)
    name = os.path.basename(os.path.normpath(model_dir)) + (" (tiny)" if tiny else "")
    return LayerKernels(name, device, log.launches, dict(collections.Counter(log.launches)), len(log.launches))


class _LaunchLog:
    """Logs torch ops that launch a kernel and Triton kernel launches while open."""

    def __init__(self) -> None:
        self.launches: list[str] = []
        self.in_triton = 0  # the interpreter's own torch ops (copying arguments) are no launches

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from triton.runtime import interpreter, jit
        log = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                op = func.__name__.split(".")[0]
                if op not in NO_KERNEL and not log.in_triton:
                    log.launches.append(f"aten.{op}")
                return func(*args, **(kwargs or {}))

        self._restore = []
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run

            def run(fn_self, *args, _original=original, **kwargs):
                if not kwargs.get("warmup"):
                    log.launches.append(f"triton.{fn_self.fn.__name__}")
                log.in_triton += 1
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    log.in_triton -= 1
            cls.run = run
            self._restore.append((cls, original))
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for cls, original in self._restore:
            cls.run = original


if __name__ == "__main__":
    sys.exit(main())
