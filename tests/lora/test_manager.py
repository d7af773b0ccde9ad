"""LoRAManager: the host cache (max_cpu_loras, LRU, reread after eviction), the resident slots (max_loras, LRU among
the adapters a step doesn't use), the step's LoRA batch, and unloading with requests in flight."""
from __future__ import annotations

import pytest
import torch

from serval.lora.manager import LoRAManager
from serval.lora.request import LoRARequest
from serval.model.loader import load_model
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.lora.peft_adapters import build_adapter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("manager")
    hf = build_tiny_model(root / "base", "llama")
    requests = []
    for adapter_id in (1, 2, 3):
        build_adapter(hf, root / f"a{adapter_id}", rank=4 * adapter_id, seed=adapter_id)
        requests.append(LoRARequest(f"a{adapter_id}", adapter_id, str(root / f"a{adapter_id}")))
    return str(root / "base"), requests


def manager(base: str, max_loras: int, max_cpu_loras: int) -> LoRAManager:
    model, _ = load_model(base, dtype=torch.float32, device=torch.device("cpu"))
    return LoRAManager(model, max_loras, 16, max_cpu_loras, torch.device("cpu"), torch.float32)


def test_host_cache_is_lru_and_rereads_after_eviction(setup):
    base, (r1, r2, r3) = setup
    lora = manager(base, 1, 2)
    first = lora.get(r1)
    assert lora.get(r1) is first  # cached
    lora.get(r2)
    lora.get(r3)  # evicts r1, the least recently used
    assert lora.host_adapter_ids() == [2, 3]
    again = lora.get(r1)
    assert again is not first and again.rank == first.rank
    assert torch.equal(again.pairs[("model.layers.0.self_attn.qkv_proj", "q")].a,
                       first.pairs[("model.layers.0.self_attn.qkv_proj", "q")].a)


def test_one_id_one_folder(setup):
    base, (r1, r2, _) = setup
    lora = manager(base, 1, 2)
    lora.get(r1)
    with pytest.raises(InvalidArgument, match="one id, one folder"):
        lora.get(LoRARequest("other", 1, r2.lora_path))


def test_slots_are_reused_least_recently_used_first(setup):
    base, (r1, r2, r3) = setup
    lora = manager(base, 2, 3)
    a1, a2, a3 = lora.get(r1), lora.get(r2), lora.get(r3)
    layer = lora.lora_layers.layers["model.layers.0.self_attn.o_proj"]
    lora.prepare([a1, None, a2], [3, 2, 1])
    batch = lora.batch()
    assert batch.token_slots.tolist() == [0, 0, 0, -1, -1, 1] and batch.max_segment_length == 3
    torch.testing.assert_close(layer.lora_a[1, :8], a2.pairs[("model.layers.0.self_attn.o_proj", None)].a)
    lora.prepare([a2], [1])  # a2 used last: a1 is the one to go
    lora.prepare([a3, a2], [1, 1])
    assert lora.batch().token_slots.tolist() == [0, 1] and lora.batch().uses_gather
    torch.testing.assert_close(layer.lora_a[0, :12], a3.pairs[("model.layers.0.self_attn.o_proj", None)].a)
    assert torch.count_nonzero(layer.lora_a[0, 12:]) == 0  # rank 12 in a slot of 16: the rest is zero
    lora.prepare([None, None], [2, 1])
    assert lora.batch() is None  # no adapter in the step: the base path


def test_more_adapters_than_slots_is_refused(setup):
    base, (r1, r2, _) = setup
    lora = manager(base, 1, 2)
    with pytest.raises(RuntimeError, match="max-loras"):
        lora.prepare([lora.get(r1), lora.get(r2)], [1, 1])


def test_removed_adapter_stays_usable_by_requests_holding_it(setup):
    """Unloading lets requests in flight finish: they hold the adapter itself, not its id."""
    base, (r1, _, _) = setup
    lora = manager(base, 1, 1)
    held = lora.get(r1)
    lora.remove(1)
    assert lora.host_adapter_ids() == []
    lora.prepare([held], [2])
    assert lora.batch().token_slots.tolist() == [0, 0]
