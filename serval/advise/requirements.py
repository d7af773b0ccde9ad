"""What the user needs, from flags or a YAML file; validated once here."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import yaml

VENDORS = ("nvidia", "amd", "intel", "cpu", "tpu", "ascend")
MODALITIES = ("text", "image", "audio")
COMPLIANCE = ("guardrails", "audit")


@dataclass
class Requirements:
    hardware: str = "nvidia"  # vendor the replicas run on
    gpu_hour_price: float | None = None  # $ per GPU-hour; default: the price recorded in the bench run
    peak_rate: float = 1.0  # requests/s at peak
    slo_ms: dict[str, float] = field(default_factory=dict)  # ttft/tpot/e2e; default: each run's own SLO
    slo_attainment: float = 0.95
    max_context: int | None = None  # longest prompt + output, tokens
    modality: str = "text"
    quantization: list[str] = field(default_factory=list)  # wished formats, e.g. fp8, awq, gguf
    compliance: list[str] = field(default_factory=list)  # guardrails, audit

    def __post_init__(self) -> None:
        self.hardware = self.hardware.lower()
        if self.hardware not in VENDORS:
            raise ValueError(f"invalid hardware: {self.hardware!r}; allowed: {', '.join(VENDORS)}")
        if self.modality not in MODALITIES:
            raise ValueError(f"invalid modality: {self.modality!r}; allowed: {', '.join(MODALITIES)}")
        unknown = [c for c in self.compliance if c not in COMPLIANCE]
        if unknown:
            raise ValueError(f"invalid compliance: {unknown}; allowed: {', '.join(COMPLIANCE)}")
        if self.peak_rate <= 0:
            raise ValueError(f"invalid peak_rate: {self.peak_rate}; allowed: > 0 requests/s")
        bad_slo = [k for k in self.slo_ms if k not in ("ttft", "tpot", "e2e")]
        if bad_slo:
            raise ValueError(f"invalid slo keys: {bad_slo}; allowed: ttft, tpot, e2e (milliseconds)")
        self.quantization = [q.lower() for q in self.quantization]

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> Requirements:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"invalid {path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})
