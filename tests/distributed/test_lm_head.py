"""The vocabulary-parallel LM head gathers the logits to rank 0 only (torch.distributed.gather, CPU and gloo): rank 0
gets the whole vocabulary's logits, equal to one device's product (the last slice's padding dropped), and a worker
gets none (an empty last dimension), since only rank 0 samples."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from serval.distributed.processes import start_context
from serval.layers.parallel import ParallelLMHead

TP = 2
HIDDEN, VOCAB, TOKENS = 16, 37, 5  # 37 = 19 + 18 (+1 padding row on rank 1)


def full_weight() -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))


def hidden_states() -> torch.Tensor:
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))


def rank_logits(rank: int, store_path: str, out_path: str) -> None:
    """In a started process: rank `rank`'s head over its vocabulary rows; saves what its forward returned."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=TP)
    try:
        rows = -(-VOCAB // TP)
        weight = full_weight()[rank * rows:(rank + 1) * rows]
        weight = torch.cat([weight, weight.new_zeros(rows - len(weight), HIDDEN)])
        head = ParallelLMHead(HIDDEN, rows, bias=False)
        head.weight.data.copy_(weight)
        head.vocab_size = VOCAB
        torch.save(head(hidden_states()), out_path)
    finally:
        dist.destroy_process_group()


def test_logits_reach_rank_0_only(tmp_path):
    context = start_context()
    outputs = [os.path.join(tmp_path, f"rank{rank}.pt") for rank in range(TP)]
    processes = [context.Process(target=rank_logits, args=(rank, os.path.join(tmp_path, "store"), outputs[rank]))
                 for rank in range(TP)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * TP
    driver, worker = (torch.load(path) for path in outputs)
    torch.testing.assert_close(driver, hidden_states() @ full_weight().t())
    assert worker.shape == (TOKENS, 0)
