"""benchmarks/attention_tune.py end to end in Triton's interpreter (--tiny): every configuration is checked against
the torch reference before it is a candidate, the causal FLOPs it reports are the keys each query sees, and the table
it writes is the one serval.kernels.triton_attention reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.attention_tune import Case
from serval.kernels import triton_attention

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_causal_flops_count_the_keys_each_query_sees():
    # 3 new tokens after 2 cached: they see 3, 4 and 5 keys; a decode row after 7 sees 8; 4 x D x H per key.
    assert Case("c", [(2, 3), (7, 1)]).causal_flops(num_heads=2, head_dim=8) == 4 * 8 * 2 * (3 + 4 + 5 + 8)


def test_tiny_run_writes_a_table_the_kernel_reads(tmp_path):
    completed = subprocess.run([sys.executable, "benchmarks/attention_tune.py", "--tiny", "--write-config",
                                "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "attention_tune.json").read_text())
    assert result["failed"] == {} and len(result["all_s"]) == 8  # the tiny grid, all correct
    table = json.loads((tmp_path / "attention,device=cpu.json").read_text())
    best = triton_attention.PrefillConfig(*result["best"])
    assert triton_attention.pick_prefill_config(table, head_dim=16, group_pad=2) == best
    assert "best PrefillConfig" in completed.stdout
