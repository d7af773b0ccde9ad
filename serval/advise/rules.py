"""Rules of thumb about engines: inputs to the advice, never its last word. Measured numbers win.

Each rule is what comparisons commonly say; the advisor checks the measurable ones against the bench
results and reports when they disagree. Capabilities change between releases: verify against your version.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineTraits:
    hardware: frozenset[str]
    multimodal: bool
    quantization: frozenset[str]
    guardrails: bool = False  # input/output rails enforced by the server itself
    audit: bool = False  # per-request audit log built in
    claims: tuple[str, ...] = field(default=())  # measurable claims: "throughput" (fastest), "shared-prefix"


ENGINES = {
    "vllm": EngineTraits(frozenset({"nvidia", "amd", "intel", "tpu", "cpu"}), True,
                         frozenset({"fp8", "awq", "gptq", "int8", "int4", "gguf", "bitsandbytes"})),
    "sglang": EngineTraits(frozenset({"nvidia", "amd"}), True, frozenset({"fp8", "awq", "gptq", "int8", "int4"}),
                           claims=("shared-prefix",)),
    "tensorrt-llm": EngineTraits(frozenset({"nvidia"}), True, frozenset({"fp8", "fp4", "int8", "int4", "awq"}),
                                 claims=("throughput",)),
    "lmdeploy": EngineTraits(frozenset({"nvidia", "ascend"}), True, frozenset({"awq", "int4", "int8", "fp8"})),
    "serval": EngineTraits(frozenset({"nvidia", "cpu"}), False, frozenset({"gguf"}), guardrails=True, audit=True),
}

CLAIM_TEXT = {
    "throughput": "highest throughput on NVIDIA GPUs (compiled engines)",
    "shared-prefix": "best on shared-prefix workloads (radix-tree prefix cache)",
}


def requirement_gaps(engine: str, requirements) -> tuple[list[str], list[str]]:
    """(blocking gaps, soft gaps) of an engine against the requirements, from the rules of thumb."""
    traits = ENGINES.get(engine)
    if traits is None:
        return [], [f"no rules of thumb for engine {engine!r}: capabilities not checked"]
    blocking, soft = [], []
    if requirements.hardware not in traits.hardware:
        blocking.append(f"runs on {', '.join(sorted(traits.hardware))}; required {requirements.hardware}")
    if requirements.modality != "text" and not traits.multimodal:
        blocking.append(f"no {requirements.modality} input; required {requirements.modality}")
    missing_quant = [q for q in requirements.quantization if q not in traits.quantization]
    if missing_quant:
        soft.append(f"quantization {', '.join(missing_quant)} not supported (has {', '.join(sorted(traits.quantization))})")
    for need in requirements.compliance:
        if not getattr(traits, need):
            soft.append(f"no built-in {need}: needs a gateway that enforces it")
    return blocking, soft
