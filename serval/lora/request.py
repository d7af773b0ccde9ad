"""LoRARequest: which adapter a request runs with (vLLM's name and fields). Torch-free: the server imports it."""
from __future__ import annotations

from dataclasses import dataclass

from serval.openai.errors import InvalidArgument


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, id and folder. The id is its identity for the engine: the prefix cache, the resident
    slots and the host cache are keyed by it, so one id must always mean one folder."""
    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidArgument("lora_name", f"invalid lora_name {self.lora_name!r}: allowed a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidArgument("lora_int_id", f"invalid lora_int_id {self.lora_int_id!r}: allowed an integer >= 1 "
                                                 "(0 is the base model)")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise InvalidArgument("lora_path", f"invalid lora_path {self.lora_path!r}: allowed a folder path")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path
