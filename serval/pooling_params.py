"""PoolingParams: what a pooling request (embed, score) asks of the pooler, with vLLM's names. Validated here, at
the edge; what depends on the model (dimensions against its hidden size) is checked by the engine."""
from __future__ import annotations

from dataclasses import dataclass

from serval.openai.errors import InvalidArgument


@dataclass(frozen=True)
class PoolingParams:
    # Matryoshka truncation: the first `dimensions` components, renormalised when the model's output is normalised.
    dimensions: int | None = None
    # L2-normalise the embedding. None: the model's pooler config says (sentence-transformers' Normalize module).
    normalize: bool | None = None
    # Apply the classifier's activation (sigmoid for one label, softmax for several) to scores. None: yes.
    activation: bool | None = None

    def __post_init__(self) -> None:
        dimensions = self.dimensions
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                       or dimensions < 1):
            raise InvalidArgument("dimensions", f"invalid dimensions={dimensions!r}: allowed an integer >= 1")
        for name in ("normalize", "activation"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise InvalidArgument(name, f"invalid {name}={getattr(self, name)!r}: allowed true, false or null")
