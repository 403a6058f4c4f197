"""Many models on Dask against the sandbox tournament: real Dask clusters of worker processes,
real papermill training runs per member, real LightGBM (also `lightgbm.dask`), the local
registry, and inference submitting the ensemble to the sandbox over the real numerapi client."""
import io
import json

import nbformat
import numpy as np
import pandas as pd
import polars as pl
import pytest
from dask.distributed import LocalCluster

from numerai_nb.config import Settings
from numerai_nb.data import (
    feature_names,
    load_feature_metadata,
    load_id_values,
    load_train,
    load_validation,
)
from numerai_nb.grid import dask_client, main, run_grid, train_booster_dask
from numerai_nb.inference import run_inference
from numerai_nb.model import load_model
from numerai_nb.registry import open_registry
from numerai_nb.sandbox import make_tournament
from numerai_nb.train import TrainParams, train_booster, validation_metrics

GRID = {"name": "small-grid", "targets": ["target", "target_cyrus_20"], "seeds": [1, 2],
        "feature_sets": ["small"], "params": {"n_estimators": 20, "learning_rate": 0.1},
        "weights": {"target_cyrus_20": 0.5}}


@pytest.fixture
def grid_env(sandbox_env, monkeypatch):
    """The sandbox environment plus CPU training, W&B offline and gates sized for the sandbox."""
    for name, value in {"LGBM_DEVICE": "cpu", "NUMERAI_FEATURE_SET": "small",
                        "WANDB_MODE": "offline", "MPLBACKEND": "Agg",
                        "NUMERAI_NB_GATE_MIN_ROWS": "100"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    return Settings.from_env()


def recomputed_ensemble(result, settings) -> tuple[pl.DataFrame, np.ndarray]:
    """The grid's validation rows and the ensemble's predictions, computed again from scratch:
    pandas per-era ranks of each member's saved predictions, weighted by the grid file."""
    members = {m.member.name: pl.read_parquet(m.predictions).to_pandas().set_index("id")
               for m in result.members}
    manifests = [json.loads((m.model_dir / "manifest.json").read_text()) for m in result.members]
    last_train_era = max(max(m["train_eras"]) for m in manifests)
    features = json.loads((result.ensemble_dir / "features.json").read_text())
    validation = load_validation(settings.version_dir / "validation.parquet", features,
                                 ["target"], last_train_era, embargo_eras=4)
    ids = validation["id"].to_list()
    weights = {"target": 1.0, "target_cyrus_20": 0.5}
    total = sum(weights[m.member.target] for m in result.members)
    ensemble = np.zeros(len(ids))
    for m in result.members:
        frame = members[m.member.name].loc[ids]
        ranks = frame.groupby("era")["prediction"].rank(method="average")
        counts = frame.groupby("era")["prediction"].transform("size")
        ensemble += (weights[m.member.target] / total) * ((ranks - 0.5) / counts).to_numpy()
    return validation, ensemble


def test_a_papermill_grid_of_four_members_is_ensembled_registered_and_submitted(
        grid_env, sandbox, tmp_path):
    settings = grid_env
    (tmp_path / "grid.yaml").write_text(json.dumps(GRID))  # JSON is YAML
    result = run_grid(settings, tmp_path / "grid.yaml", tmp_path / "grid", workers=2)

    # every member ran as its own papermill training run, with its own report and parameters
    assert result.workers == 2 and len(result.members) == 4
    run_dirs = {m.run_dir for m in result.members}
    assert len(run_dirs) == 4 and all(d.parent == tmp_path / "grid" for d in run_dirs)
    for m in result.members:
        assert m.report == m.run_dir / "train.ipynb" and (m.run_dir / "train.html").is_file()
        notebook = nbformat.read(m.report, as_version=4)
        injected = next(c for c in notebook.cells if "injected-parameters" in c.metadata.get(
            "tags", []))
        assert f"target = \"{m.member.target}\"" in injected.source
        assert f"seed = {m.member.seed}" in injected.source
        assert not [o for c in notebook.cells for o in c.get("outputs", [])
                    if o.get("output_type") == "error"]
        assert json.loads((m.run_dir / "result.json").read_text())["status"] == "trained"
        assert load_model(m.model_dir).manifest["target"] == m.member.target

    # the ensemble's metrics equal a direct recomputation from the members' predictions
    validation, expected = recomputed_ensemble(result, settings)
    folder = settings.version_dir
    summary, _ = validation_metrics(
        validation, expected, "target",
        load_id_values(folder / "validation_example_preds.parquet", "validation_example_preds"),
        load_id_values(folder / "meta_model.parquet", "meta_model"),
        json.loads((result.ensemble_dir / "features.json").read_text()))
    saved = json.loads((result.ensemble_dir / "metrics.json").read_text())
    for name in ("corr_mean", "corr_std", "corr_sharpe", "max_drawdown", "mmc_mean",
                 "example_preds_corr", "max_feature_exposure", "eras"):
        assert saved[name] == pytest.approx(summary[name], abs=1e-9), name
    ensemble = load_model(result.ensemble_dir)
    assert ensemble.kind == "ensemble" and len(ensemble.members) == 4
    assert np.allclose(ensemble.predict(validation), expected)
    assert sorted(m.weight for m in ensemble.members) == pytest.approx([1 / 6] * 2 + [1 / 3] * 2)

    # the grid's report compares every member with the ensemble, as a table and a plot
    report = result.report["markdown"].read_text()
    for m in result.members:
        assert f"| {m.member.name} | {m.member.target} |" in report
    assert "| ensemble |" in report and "promoted to prod" in report
    assert result.report["html"].read_text().count("<tr") == 6
    assert result.report["plot"].read_bytes()[:4] == b"\x89PNG"
    per_era = pl.read_csv(tmp_path / "grid" / "per_era_corr.csv",
                          schema_overrides={"era": pl.String})
    assert per_era.columns == ["era", *(m.member.name for m in result.members), "ensemble"]
    assert per_era["ensemble"].mean() == pytest.approx(saved["corr_mean"])

    # the ensemble went through the registry's promotion rule and comes back intact
    assert result.decision.promoted and result.version.version
    registry = open_registry(settings)
    resolved = load_model(registry.resolve("prod"))
    assert resolved.kind == "ensemble" and resolved.digest == ensemble.digest
    assert registry.get("prod").version == result.version.version
    assert [v.version for v in registry.versions()] == [result.version.version]  # members not

    # inference, unchanged, submits with it
    submitted = run_inference(settings, tmp_path / "inference")
    assert (submitted.status, submitted.exit_code) == ("submitted", 0)
    assert submitted.model_version == result.version.version
    [received] = sandbox.submissions()
    csv = pd.read_csv(io.BytesIO(received.csv_bytes()))
    assert csv["prediction"].between(0, 1).all() and csv["prediction"].nunique() > 1


def test_an_existing_cluster_trains_lightgbm_dask_like_one_machine_and_runs_the_grid_command(
        grid_env, tmp_path, tournament_spec, monkeypatch, capsys):
    """One two-worker cluster, joined through DASK_SCHEDULER_ADDRESS: data-parallel LightGBM
    scores like single-machine training on the same data, and `numerai-nb grid` runs on it."""
    folder = make_tournament(tmp_path / "tournament", tournament_spec)
    features = feature_names(load_feature_metadata(folder / "features.json"), "small")
    params = TrainParams(n_estimators=20, learning_rate=0.1, colsample_bytree=0.5, seed=3,
                         device="cpu")
    train = load_train(folder / "train.parquet", features, every_nth_era=1)
    validation = load_validation(folder / "validation.parquet", features, ["target"],
                                 train["era"].max(), embargo_eras=0)
    single = train_booster(train, features, "target", params, progress=False)
    grid = {"name": "seeds", "targets": ["target"], "seeds": [1, 2],
            "params": {"n_estimators": 10, "learning_rate": 0.1}}
    (tmp_path / "grid.yaml").write_text(json.dumps(grid))
    (tmp_path / "bad.yaml").write_text(json.dumps({**grid, "targets": ["target_nowhere"]}))
    out = tmp_path / "grid"

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        with dask_client(workers=1) as client:  # joins the running cluster, ignoring `workers`
            assert len(client.scheduler_info()["workers"]) == 2
            distributed = train_booster_dask(client, [folder / "train.parquet"], features,
                                             "target", params)
        code = main([str(tmp_path / "grid.yaml"), "--out", str(out), "--mode", "in_process",
                     "--weight", "s2=3", "--no-register"])
        printed = capsys.readouterr()
        failed = main([str(tmp_path / "bad.yaml"), "--mode", "in_process"])
        failure = capsys.readouterr().err

    assert distributed.num_trees() == single.num_trees() == 20
    scores = {name: validation_metrics(validation, booster.predict(
        validation.select(features).to_numpy()))[0]["corr_mean"]
        for name, booster in (("single", single), ("dask", distributed))}
    assert scores["single"] > 0.05
    assert scores["dask"] == pytest.approx(scores["single"], abs=0.01)

    assert code == 0, printed.err
    assert "| ensemble |" in printed.out
    saved = json.loads((out / "result.json").read_text())
    assert saved["workers"] == 2 and saved["model_version"] is None
    weights = {m["name"]: m["weight"] for m in
               json.loads((out / "ensemble" / "ensemble.json").read_text())["members"]}
    assert weights == pytest.approx({"target-small-base-s1": 0.25, "target-small-base-s2": 0.75})
    assert open_registry(grid_env).versions() == []

    assert failed == 1
    assert "2 of 2 members failed" in failure and "target_nowhere-small-base-s1" in failure
