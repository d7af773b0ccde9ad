"""The torch reference attention for the steps that graph-shaped steps are checked against, and for prefills.

On the CPU a graph-shaped forward (decode, mixed, verify and head graphs, uncaptured) runs the Triton kernels in
Triton's interpreter, since only they read every length from the graphs' fixed buffers. Running the plain steps
and prefills there too tests nothing more and costs most of these tests' time: the plain path through the Triton
kernels is checked against transformers on its own (tests/engine/test_engine.py::
test_triton_kernels_in_the_engine_match_transformers), and the kernels against the torch reference in tests/kernels.
"""
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from serval import LLM
from serval.kernels import paged_attention as torch_attention
from serval.layers.attention import Attention


@contextmanager
def reference_attention(model: torch.nn.Module) -> Iterator[None]:
    """The model's attention layers on the torch reference for the duration, then back on what they ran."""
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    chosen = [layer._backend for layer in layers]
    for layer in layers:
        layer._backend = torch_attention
    try:
        yield
    finally:
        for layer, backend in zip(layers, chosen):
            layer._backend = backend


def reference_generate(llm: LLM, requests: list[dict], params) -> list:
    """llm.generate with attention on the torch reference: the plain engine's outputs."""
    with reference_attention(llm.engine.model):
        return llm.generate(requests, params, use_tqdm=False)


def eager_steps_on_reference(runner) -> None:
    """The runner's eager steps (runner.forward_logits: prefills, steps no graph takes, and the plain forward a
    graph-shaped step is compared with) attend with the torch reference; graph-shaped steps keep what they run."""
    forward_logits = runner.forward_logits

    def on_reference(inputs, *gather):
        with reference_attention(runner.model):
            return forward_logits(inputs, *gather)

    runner.forward_logits = on_reference
