"""Multi-LoRA serving: PEFT adapters on one base model, batched together (S-LoRA / Punica style).

request.py: LoRARequest, what a caller names an adapter with (vLLM's). adapter.py: reading and checking a PEFT
adapter against the base model. manager.py: the adapters kept in host memory (--max-cpu-loras, LRU) and the ones
resident in the model's slots (--max-loras). batch.py: one step's per-row adapter slots for the kernels.
The layers that apply them are serval.layers.lora; the kernels serval.kernels.triton_lora.
"""
from serval.lora.request import LoRARequest

__all__ = ["LoRARequest"]
