"""benchmarks/attention_bandwidth.py's choice of the decode launch and the table entry it writes, which
serval.kernels.triton_attention reads back (the GPU run is recorded in docs/performance.md)."""
from __future__ import annotations

import json

from benchmarks.attention_bandwidth import best_decode_config, write_decode_config
from serval.kernels import triton_attention


def test_the_decode_choice_is_the_least_total_over_cases_it_ran_in_all():
    rows = [{"decode": True, "configs_s": {"[16, 64, 2, 3, 0]": 2.0, "[16, 64, 4, 2, 0]": 1.5,
                                           "[16, 32, 2, 2, 0]": 0.1}},
            {"decode": True, "configs_s": {"[16, 64, 2, 3, 0]": 1.0, "[16, 64, 4, 2, 0]": 2.0,
                                           "[16, 32, 2, 2, 0]": "OutOfResources"}},
            {"decode": False, "configs_s": {"[16, 64, 4, 2, 0]": 0.01}}]  # a mixed step's flat configs don't count
    assert best_decode_config(rows) == [16, 64, 2, 3, 0]
    assert best_decode_config([r for r in rows if not r["decode"]]) is None


def test_the_written_entry_is_what_the_kernel_picks_and_prefill_is_kept(tmp_path):
    path = tmp_path / "attention,device=X.json"
    path.write_text(json.dumps({"device": "X", "prefill": {"D=128,G=4": [64, 64, 4, 3, 1]}}))
    table = write_decode_config(str(path), "X", "D=128,G=4", [16, 64, 2, 3, 0])
    assert json.loads(path.read_text()) == table
    assert triton_attention.pick_decode_config(table, 128, 4) == triton_attention.PrefillConfig(16, 64, 2, 3, 0)
    assert triton_attention.pick_prefill_config(table, 128, 4) == triton_attention.PrefillConfig(64, 64, 4, 3, 1)
    # another shape, or no table: the built-in launch
    assert triton_attention.pick_decode_config(table, 64, 4) == triton_attention.PREFILL_CONFIG
    assert triton_attention.pick_decode_config(None, 128, 4) == triton_attention.PREFILL_CONFIG
