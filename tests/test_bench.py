"""The benchmark at its quick scale: real worker processes, real LightGBM, real files.

Numbers are never compared with the targets here; the tests prove the benchmark runs and
always reports the same shape.
"""
import json
import re

import pytest

from numerai_nb import bench


def _shape(obj):
    "The keys of `obj`, recursively; every value reduced to a placeholder."
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape(v) for v in obj]
    return "value"


def _md_shape(text: str) -> list[str]:
    "The markdown with numbers, verdicts and paths masked: what must not change between runs."
    text = re.sub(r"\*\*not met\*\*|\bmet\b", "VERDICT", text)
    text = re.sub(r"\b(True|False)\b", "BOOL", text)
    text = re.sub(r"step \w+", "step NAME", text)
    return [re.sub(r"\d[\d,.:+T-]*", "N", line) for line in text.splitlines()]


def test_quick_bench_twice_gives_the_same_shape(tmp_path, monkeypatch, capsys):
    "`numerai-nb bench --quick` writes bench.json and bench.md; a second run has their shape."
    monkeypatch.setenv("NUMERAI_NB_HOME", str(tmp_path / "home"))
    assert bench.main(["--quick", "--out", str(tmp_path / "first")]) == 0
    assert "# Benchmark `quick`" in capsys.readouterr().out
    assert bench.main(["--quick", "--out", str(tmp_path / "second")]) == 0

    first = json.loads((tmp_path / "first" / "bench.json").read_text())
    second = json.loads((tmp_path / "second" / "bench.json").read_text())
    assert _shape(first) == _shape(second)
    assert (first["data"]["reused"], second["data"]["reused"]) == (False, True)
    assert first["data"]["folder"].startswith(str(tmp_path / "home" / "bench-data"))

    for path in ("example", "ours"):
        summary = first[path]
        assert (summary["rows"], summary["features"], summary["trees"]) == (2_000, 40, 20)
        assert summary["peak_rss_mb"] >= summary["peak_rss_after_load_mb"] > 0
        assert summary["peak_rss_after_load_mb"] >= summary["rss_after_imports_mb"] > 0
        assert summary["bytes_per_cell"] == pytest.approx(
            summary["peak_rss_mb"] * 1e6 / (2_000 * 40), rel=0.01)
        assert summary["train_s"] > 0 and summary["load_s"] >= 0
    assert set(first["ratios"]) == {"peak_rss_mb", "bytes_per_cell", "load_s", "train_s"}
    assert [t["target"].split(",")[0].split(" (")[0] for t in first["targets"]] == [
        "peak memory per feature cell", "training wall time", "inference with gates"]
    assert all(isinstance(t["met"], bool) for t in first["targets"])

    inference = first["inference"]
    assert (inference["rows"], inference["features"]) == (1_200, 40)
    assert list(inference["steps_s"]) == list(bench.INFERENCE_STEPS)
    assert inference["gates_passed"] and inference["failed_gates"] == []
    assert inference["total_s"] == pytest.approx(
        sum(v for k, v in inference["steps_s"].items() if k != "imports"), abs=0.01)
    model_dir = tmp_path / "first" / "model"
    assert (model_dir / "manifest.json").exists() and (tmp_path / "first" /
                                                       "bench_submission.csv").exists()
    assert first["capacity"]["estimated"] and first["capacity"]["features"] == 2748

    md_first = (tmp_path / "first" / "bench.md").read_text()
    md_second = (tmp_path / "second" / "bench.md").read_text()
    assert _md_shape(md_first) == _md_shape(md_second)
    for heading in ("## Training", "## Targets", "## Inference on a live-sized frame",
                    "## Largest training set of N features", "## What is measured"):
        assert heading in "\n".join(_md_shape(md_first)), heading
    training_rows = [line for line in md_first.splitlines() if line.startswith("| ")]
    assert len(training_rows) >= 2 + len(bench._ROWS) + 1 + 3 + 1 + len(bench.INFERENCE_STEPS)


def test_a_failing_worker_names_itself_and_shows_its_log(tmp_path):
    "A worker that fails stops the benchmark with its exit code and the end of its log."
    with pytest.raises(bench.BenchError, match=r"the nonsense worker failed \(exit 1\)") as info:
        bench.run_worker({"kind": "nonsense", "data_dir": str(tmp_path)}, tmp_path)
    assert "unknown worker kind 'nonsense'" in str(info.value)
    assert (tmp_path / "worker-nonsense.log").exists()


def test_inference_needs_our_training_path(tmp_path):
    "The inference path loads the model our path trains, so it cannot run without it."
    with pytest.raises(bench.BenchError, match="include 'ours'"):
        bench.run_bench(tmp_path, "quick", paths=["example", "inference"])
