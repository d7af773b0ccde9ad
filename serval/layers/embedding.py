"""The token embedding, created without its random initialisation.

Every load path (checkpoint, GGUF, dummy weights) overwrites the table, and nn.Embedding's normal_ init of a
large vocabulary is work thrown away: on the default model's CPU start it was 5% of the time to /health
(docs/performance.md). Linear.reset_parameters skips its init for the same reason.

Tied to an LM head whose format keeps the table packed (a GGUF's Q8_0 on the CPU, serval.layers.quant.gguf_q8),
the embedding holds no weight of its own and reads its rows from the head's format.
"""
from __future__ import annotations

import torch
from torch import nn


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass

    def read_rows_from(self, head: nn.Module) -> None:
        """Drop the float table; look rows up in `head`'s format (its quant_method.embed) from now on."""
        self.__dict__["rows_dtype"] = self.weight.dtype
        # In __dict__, not as a submodule: named_modules would otherwise list the head under this module's name.
        self.__dict__["tied_head"] = head
        self.weight = None

    def share(self, other: Embedding) -> None:
        """Read the same table as `other` (an EAGLE-3 head and its target): its weight, or its packed head."""
        if other.weight is None:
            self.read_rows_from(other.__dict__["tied_head"])
        else:
            self.weight = other.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            head = self.__dict__["tied_head"]
            return head.quant_method.embed(head, input_ids, self.__dict__["rows_dtype"])
        return super().forward(input_ids)
