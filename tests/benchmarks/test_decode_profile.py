"""benchmarks/decode_profile.py --prefill on the CPU (--tiny): the profiled step is the model's prefill, so its
operators include one matmul per projection of every layer, and the wall time is of the same step unprofiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_prefill_profile_sees_every_projection(tmp_path):
    completed = subprocess.run([sys.executable, "benchmarks/decode_profile.py", "--tiny", "--prefill",
                                "--prompt-len", "48", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "prefill_profile.json").read_text())
    config = json.loads((tmp_path / "tiny_model" / "config.json").read_text())
    matmuls = {row["name"]: row["calls"] for row in result["operators_by_self_cpu"]}.get("aten::mm", 0)
    # qkv, o, gate_up and down per layer (one step), and the LM head on the last row
    assert matmuls == 4 * config["num_hidden_layers"] + 1
    assert result["prompt_len"] == 48 and result["wall_ms"] > 0
    assert "48-token prefill step" in completed.stdout
