"""The advisor on recorded result files: replicas from measured goodput, cost, ranking, rules vs measurements."""
import json

import pytest

from serval.advise.advisor import advise, format_advice
from serval.advise.cli import main
from serval.advise.requirements import Requirements


def record(result_dir, endpoints, workload="random", slo_ms=None, gpu_hour_price=2.0, num_gpus=1):
    """A bench result directory: endpoints = {name: (engine, {rate: [(ttft_s, tpot_s, ok), ...]})}, 10 s runs."""
    result_dir.mkdir()
    report = {"config": {"slo_ms": slo_ms or {"ttft": 500.0}, "gpu_hour_price": gpu_hour_price, "num_gpus": num_gpus,
                         "workload": {"name": workload, "input_len": 1000, "output_len": 100, "range_ratio": 0.0,
                                      "prefix_len": 0}}, "endpoints": []}
    rows = []
    for name, (engine, runs) in endpoints.items():
        entry = {"endpoint": {"name": name, "engine": engine}, "runs": []}
        for rate, requests in runs.items():
            entry["runs"].append({"request_rate": rate, "summary": {"duration_s": 10.0, "ttft_ms": {
                "p99": max(t for t, _, _ in requests) * 1000}}})
            rows += [{"endpoint": name, "request_rate": rate, "ttft": ttft, "tpot": tpot, "e2e": ttft + 99 * tpot,
                      "error_type": None if ok else "http_500"} for ttft, tpot, ok in requests]
        report["endpoints"].append(entry)
    (result_dir / "summary.json").write_text(json.dumps(report))
    (result_dir / "requests.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(result_dir)


@pytest.fixture
def recorded(tmp_path):
    fast, slow = (0.1, 0.02, True), (0.9, 0.02, True)
    return record(tmp_path / "run", {
        "vllm-a": ("vllm", {10.0: [fast] * 100, 20.0: [fast] * 200}),  # 20 good req/s at rate 20
        "trt": ("tensorrt-llm", {10.0: [fast] * 95 + [slow] * 5, 20.0: [fast] * 150 + [slow] * 50}),
    })


def test_replicas_and_monthly_cost_from_measured_goodput(recorded):
    advice = advise(Requirements(peak_rate=50.0, gpu_hour_price=3.0), [recorded])
    top, second = advice["ranking"][:2]
    assert top["name"] == "vllm-a" and top["capacity_rps"] == pytest.approx(20.0) and top["replicas"] == 3
    assert top["monthly_cost"] == pytest.approx(3 * 1 * 3.0 * 730)
    # trt at rate 20 keeps only 75% within ttft 500 ms; at rate 10 it keeps 95%: 9.5 req/s -> 6 replicas
    assert second["name"] == "trt" and second["capacity_rps"] == pytest.approx(9.5) and second["replicas"] == 6
    assert any("tensorrt-llm has the highest throughput" in note and "vllm-a" in note
               for note in advice["disagreements"])
    assert any("above the highest measured rate 20" in gap for gap in advice["not_measured"])
    assert {c["name"] for c in advice["ranking"] if c["source"] is None} == {"sglang", "lmdeploy", "serval"}


def test_user_slo_recomputes_goodput(recorded):
    advice = advise(Requirements(peak_rate=5.0, slo_ms={"ttft": 50.0}), [recorded])
    measured = [c for c in advice["ranking"] if c["source"]]
    assert all(c["capacity_rps"] == 0.0 and c["replicas"] is None for c in measured)
    assert "cannot meet the SLOs as measured" in format_advice(advice)


def test_requirements_decide_before_cost(recorded):
    advice = advise(Requirements(hardware="amd", peak_rate=5.0, modality="image", compliance=["guardrails"],
                                 max_context=32000), [recorded])
    by_name = {c["name"]: c for c in advice["ranking"]}
    assert by_name["trt"]["blocking"] == ["runs on nvidia; required amd"]
    assert any("no built-in guardrails" in gap for gap in by_name["vllm-a"]["soft"])
    assert "no image input; required image" in by_name["serval"]["blocking"]
    names = [c["name"] for c in advice["ranking"]]
    assert names.index("trt") > names.index("vllm-a")
    assert any("context 32000" in gap for gap in advice["not_measured"])
    assert any("trt was measured" in note for note in advice["disagreements"])


def test_cli_with_yaml_requirements(recorded, tmp_path, capsys):
    (tmp_path / "needs.yaml").write_text("hardware: nvidia\npeak_rate: 40\ngpu_hour_price: 2.5\n")
    out = tmp_path / "advice.json"
    assert main([recorded, "--requirements", str(tmp_path / "needs.yaml"), "--output-json", str(out)]) == 0
    assert "1. **vllm-a** (vllm): 2 replica(s), $3,650/month" in capsys.readouterr().out
    assert json.loads(out.read_text())["ranking"][0]["replicas"] == 2
    (tmp_path / "bad.yaml").write_text("hardware: nvidia\npeak: 40\n")
    assert main([recorded, "--requirements", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown keys ['peak']" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
