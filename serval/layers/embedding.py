"""The token embedding, created without its random initialisation.

Every load path (checkpoint, GGUF, dummy weights) overwrites the table, and nn.Embedding's normal_ init of a
large vocabulary is work thrown away: on the default model's CPU start it was 5% of the time to /health
(docs/performance.md). Linear.reset_parameters skips its init for the same reason.
"""
from __future__ import annotations

from torch import nn


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass
