"""LoRAManager: the adapters in host memory and the ones resident in the model's slots.

    registered (by id) ──get()──► host cache: up to max_cpu_loras LoRAAdapters, LRU (a miss reads the folder again)
                                  │ a request holds its LoRAAdapter from admission to its end
    step's requests ──prepare()──► slots: max_loras per LoRA layer, LRU among those the step doesn't use
                                  └► LoRABatch (each row's slot) on the layers' shared LoRAContext
    decode graph step ──slots_for()──► the same slots; each request's slot goes into the graph's input buffer

A request keeps a reference to its LoRAAdapter (Request.lora_adapter), so an adapter unloaded or evicted from the
host cache while requests use it stays readable until the last of them ends: unloading lets requests in flight
finish. The scheduler keeps the adapters of the running requests within max_loras, so a step always fits the
slots. Reading a folder happens on the caller's thread (never the engine loop); the slot copies are the engine's.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch
from torch import nn

from serval.layers.lora import LoRAContext, LoRALayers, wrap_lora_layers
from serval.lora.adapter import LoRAAdapter, TargetKey, TargetShape, load_adapter
from serval.lora.batch import LoRABatch, build_lora_batch
from serval.lora.request import LoRARequest
from serval.openai.errors import InvalidArgument

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.device, self.dtype = device, dtype
        self.lora_layers: LoRALayers = wrap_lora_layers(model, max_loras, max_lora_rank,
                                                        use_triton=_use_triton(device))
        self.targets: dict[TargetKey, TargetShape] = {
            (path, part.name): TargetShape(layer.in_features, part.size)
            for path, layer in self.lora_layers.layers.items() for part in layer.slices}
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # adapter id -> adapter, oldest use first
        self._lock = threading.Lock()  # the host cache is read by frontend threads and loaded by route handlers
        # adapter id -> (slot, the adapter copied there), least recently used first
        self._slots: OrderedDict[int, tuple[int, LoRAAdapter]] = OrderedDict()

    # ---- host memory (any thread) ----
    def get(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter, from the host cache or read from its folder; InvalidArgument if it is bad."""
        with self._lock:
            adapter = self._host.get(request.lora_int_id)
            if adapter is not None:
                if adapter.request.lora_path != request.lora_path:
                    raise InvalidArgument("lora_int_id", f"invalid lora_int_id {request.lora_int_id}: it already "
                                          f"names the adapter at {adapter.request.lora_path!r}; one id, one folder")
                self._host.move_to_end(request.lora_int_id)
                return adapter
        adapter = load_adapter(request, self.targets, self.max_lora_rank, self.dtype)  # outside the lock: disk
        with self._lock:
            self._host[request.lora_int_id] = adapter
            self._host.move_to_end(request.lora_int_id)
            while len(self._host) > self.max_cpu_loras:
                evicted, _ = self._host.popitem(last=False)
                logger.info("lora adapter evicted from host memory", extra={"lora_int_id": evicted})
        logger.info("lora adapter loaded", extra={"lora_name": request.lora_name, "lora_int_id": request.lora_int_id,
                                                  "rank": adapter.rank, "bytes": adapter.num_bytes})
        return adapter

    def remove(self, adapter_id: int) -> None:
        """Forget the adapter in host memory (requests holding it still finish with it)."""
        with self._lock:
            self._host.pop(adapter_id, None)

    def host_adapter_ids(self) -> list[int]:
        with self._lock:
            return list(self._host)

    # ---- resident slots (the engine's thread) ----
    def prepare(self, adapters: list[LoRAAdapter | None], rows_per_request: list[int]) -> None:
        """Make the step's adapters resident and set its LoRABatch; none (the base path) if no row has one."""
        if all(adapter is None for adapter in adapters):
            self.lora_layers.context.batch = None
            return
        self.lora_layers.context.batch = build_lora_batch(rows_per_request, self.slots_for(adapters), self.device)

    def slots_for(self, adapters: list[LoRAAdapter | None]) -> list[int]:
        """Each request's resident slot (-1: no adapter), copying adapters into slots (in place) as needed: what a
        decode graph's slot region is filled with."""
        slot_of = self._activate({adapter.adapter_id: adapter for adapter in adapters if adapter is not None})
        return [-1 if adapter is None else slot_of[adapter.adapter_id] for adapter in adapters]

    @property
    def context(self) -> LoRAContext:
        """What the model's LoRA layers read each step's batch from (a decode graph sets it while capturing)."""
        return self.lora_layers.context

    def clear(self) -> None:
        self.lora_layers.context.batch = None

    def batch(self) -> LoRABatch | None:
        return self.lora_layers.context.batch

    def _activate(self, wanted: dict[int, LoRAAdapter]) -> dict[int, int]:
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step holds {len(wanted)} adapters but --max-loras is {self.max_loras}; the "
                               "scheduler should have kept it within")
        for adapter_id in wanted:
            if adapter_id in self._slots:
                self._slots.move_to_end(adapter_id)
        for adapter_id, adapter in wanted.items():
            resident = self._slots.get(adapter_id)
            if resident is not None and resident[1] is adapter:
                continue
            if resident is not None:  # the same id read again (evicted from host memory meanwhile): refresh it
                slot = resident[0]
            elif len(self._slots) < self.max_loras:
                slot = len(self._slots)
            else:
                evicted = next(i for i in self._slots if i not in wanted)
                slot = self._slots.pop(evicted)[0]
            self._load_slot(slot, adapter)
            self._slots[adapter_id] = (slot, adapter)
        return {adapter_id: self._slots[adapter_id][0] for adapter_id in wanted}

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        by_layer: dict[str, dict] = {}
        for (path, part), pair in adapter.pairs.items():
            by_layer.setdefault(path, {})[part] = pair
        for path, layer in self.lora_layers.layers.items():
            layer.set_slot(slot, by_layer.get(path, {}))


def _use_triton(device: torch.device) -> bool:
    """The Triton kernels on CUDA unless SERVAL_LORA=torch; SERVAL_LORA=triton takes them on any device (on CPU,
    Triton's interpreter with TRITON_INTERPRET=1, as tests do)."""
    choice = os.environ.get("SERVAL_LORA")
    return choice == "triton" or (device.type == "cuda" and choice != "torch")
