"""The benchmark at its quick scale: real worker processes, real LightGBM, real files.

Numbers are never compared with the targets here; the tests prove the benchmark runs and
always reports the same shape.
"""
import json

import pytest

from numerai_nb import bench

SUMMARY_KEYS = {"rows", "features", "trees", "peak_rss_mb", "rss_after_imports_mb",
                "peak_rss_after_load_mb", "bytes_per_cell", "import_s", "load_s", "train_s",
                "train_cpu_s", "load_average", "repeats", "train_s_all"}


def test_quick_bench_writes_the_report_in_its_fixed_shape(tmp_path, monkeypatch, capsys):
    "`numerai-nb bench --quick` writes bench.json and bench.md with every key, row and column."
    monkeypatch.setenv("NUMERAI_NB_HOME", str(tmp_path / "home"))
    assert bench.main(["--quick", "--out", str(tmp_path / "run")]) == 0
    assert "# Benchmark `quick`" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "bench.json").read_text())

    assert set(report) == {"created_at", "scale", "data", "machine", "example", "ours",
                           "inference", "grid", "ratios", "targets", "capacity", "method",
                           "repeats", "workers"}
    assert report["data"]["folder"].startswith(str(tmp_path / "home" / "bench-data"))
    assert not report["data"]["reused"]
    assert bench.make_bench_data(tmp_path / "home" / "bench-data",
                                 bench.SCALES["quick"])[1]["reused"]
    for path in ("example", "ours"):
        summary = report[path]
        assert set(summary) == SUMMARY_KEYS
        assert (summary["rows"], summary["features"], summary["trees"]) == (2_000, 40, 20)
        assert summary["peak_rss_mb"] >= summary["peak_rss_after_load_mb"] > 0
        assert summary["peak_rss_after_load_mb"] >= summary["rss_after_imports_mb"] > 0
        assert summary["bytes_per_cell"] == pytest.approx(
            summary["peak_rss_mb"] * 1e6 / (2_000 * 40), rel=0.01)
        assert summary["train_s"] > 0 and summary["load_s"] >= 0
    assert set(report["ratios"]) == {"peak_rss_mb", "bytes_per_cell", "load_s", "train_s"}
    assert [t["target"].split(",")[0].split(" (")[0] for t in report["targets"]] == [
        "peak memory per feature cell", "training wall time", "inference with gates"]
    assert all(set(t) == {"target", "value", "unit", "limit", "met", "note"}
               and isinstance(t["met"], bool) for t in report["targets"])

    inference = report["inference"]
    assert (inference["rows"], inference["features"]) == (1_200, 40)
    assert set(inference["steps_s"]) == set(bench.INFERENCE_STEPS)
    assert inference["gates_passed"] and inference["failed_gates"] == []
    assert inference["total_s"] == pytest.approx(
        sum(v for k, v in inference["steps_s"].items() if k != "imports"), abs=0.01)
    assert (tmp_path / "run" / "model" / "manifest.json").exists()
    assert (tmp_path / "run" / "bench_submission.csv").read_text().startswith("id,prediction")
    assert report["capacity"]["estimated"] and report["capacity"]["features"] == 2748

    markdown = (tmp_path / "run" / "bench.md").read_text()
    headings = [line for line in markdown.splitlines() if line.startswith("#")]
    assert [h.split(" (")[0].split(" of ")[0] for h in headings] == [
        "# Benchmark `quick`, " + report["created_at"], "## Training", "## Targets",
        "## Inference on a live-sized frame", "## Largest training set", "## Many models on Dask",
        "## What is measured"]
    rows = [line.split(" | ")[0].lstrip("| ") for line in markdown.splitlines()
            if line.startswith("| ") and "---" not in line]
    assert rows == (["", *[label for label, _, _ in bench._ROWS], "target",
                     *[t["target"] for t in report["targets"]], "step",
                     *bench.INFERENCE_STEPS, "**total without imports**", "grid",
                     *[g["step"] for g in report["grid"]]])
    assert [(g["workers"], g["members"]) for g in report["grid"]] == [(1, 4), (2, 4)]
    assert all(g["seconds"] > 0 and g["corr_mean"] > 0 for g in report["grid"])
    sections = markdown.split("\n## ")
    for title, columns in (("Training", 4), ("Targets", 5), ("Inference", 2), ("Many", 4)):
        table = [line for line in next(x for x in sections if x.startswith(title)).splitlines()
                 if line.startswith("|")]
        assert table and all(line.count("|") == columns + 1 for line in table), title


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
