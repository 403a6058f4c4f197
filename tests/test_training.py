"""Training on the sandbox tournament: data loading, LightGBM, metrics and the model directory.

Everything here is real: sandbox parquet files on disk, polars, LightGBM (CPU build, so the GPU
request falls back), numerai-tools. Sizes are the sandbox defaults (4 000 train rows), so each
training takes well under a second.
"""
import json
import shutil
import warnings

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from numerai_tools.scoring import numerai_corr

from numerai_nb.config import ModelIntegrityError, Settings, sha256_file
from numerai_nb.data import (
    feature_names,
    load_feature_metadata,
    load_live,
    load_train,
    load_validation,
    sample_eras,
)
from numerai_nb.model import (
    MANIFEST,
    MODEL_FILES,
    directory_digest,
    load_model,
    rank_within,
    save_ensemble_dir,
    verify_model_dir,
)
from numerai_nb.sandbox import make_tournament
from numerai_nb.train import (
    GpuFallbackWarning,
    TrainParams,
    gpu_problem,
    train_and_save,
    train_booster,
    training_dataset,
)

QUICK = dict(n_estimators=50, learning_rate=0.05, colsample_bytree=0.5, num_threads=1)


@pytest.fixture
def settings(tmp_path, tournament_spec, monkeypatch) -> Settings:
    """Settings whose version folder holds a fresh sandbox tournament, state under tmp_path."""
    monkeypatch.setenv("NUMERAI_NB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NUMERAI_DATA_DIR", str(tmp_path / "data"))
    result = Settings.from_env(feature_set="small", lgbm_device="cpu")
    make_tournament(result.version_dir, tournament_spec)
    return result


@pytest.fixture
def trained(settings, tmp_path):
    """The whole training step run once on the sandbox, with its settings."""
    result = train_and_save(settings, TrainParams(device="cpu", **QUICK),
                            tmp_path / "models" / "m1", progress=False)
    return settings, result


def small_features(settings: Settings) -> list[str]:
    return feature_names(load_feature_metadata(settings.version_dir / "features.json"), "small")


def test_train_and_save_finds_the_planted_signal_and_writes_the_directory(trained,
                                                                          tournament_spec):
    settings, result = trained
    metrics = result.metrics
    assert metrics["corr_mean"] > 0.01, metrics
    assert metrics["example_preds_corr"] > 0 and metrics["max_feature_exposure"] > 0
    assert metrics["mmc_mean"] is not None and 0 < metrics["mmc_eras"] < metrics["eras"]

    folder = result.model_dir
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MODEL_FILES, MANIFEST])
    manifest = json.loads((folder / MANIFEST).read_text())
    kept = sample_eras(settings.version_dir / "train.parquet", 4)
    assert manifest["train_eras"] == kept == [f"{e:04d}" for e in range(1, 41, 4)]
    last_scored = tournament_spec.train_eras + tournament_spec.validation_eras \
        - tournament_spec.unscored_eras
    assert manifest["validation_eras"] == [f"{e:04d}" for e in range(int(kept[-1]) + 5,
                                                                     last_scored + 1)]
    assert (manifest["dataset_version"], manifest["feature_set"], manifest["target"]) == \
        ("v5.2", "small", "target")
    assert manifest["kind"] == "model" and manifest["libraries"]["lightgbm"]
    assert manifest["git_commit"] is None or len(manifest["git_commit"]) == 40
    assert manifest["files"] == {n: sha256_file(folder / n) for n in MODEL_FILES}
    assert manifest["digest"] == directory_digest(manifest["files"])

    features = small_features(settings)
    assert json.loads((folder / "features.json").read_text()) == features
    assert json.loads((folder / "params.json").read_text())["n_estimators"] == 50
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(
        json.dumps(metrics))
    reference = json.loads((folder / "reference.json").read_text())
    assert sorted(reference["features"]) == sorted(features)
    shares = reference["features"][features[0]]
    assert abs(sum(shares.values()) - 1) < 1e-4
    assert reference["predictions"]["count"] == manifest["validation_rows"] == \
        len(manifest["validation_eras"]) * tournament_spec.rows_per_era
    assert (folder / "model.txt").read_text().startswith("tree")


def test_metrics_equal_numerai_tools_called_directly(trained):
    settings, result = trained
    features = small_features(settings)
    validation = load_validation(settings.version_dir / "validation.parquet", features,
                                 last_train_era="0037")
    frame = validation.to_pandas().set_index("id")
    frame["prediction"] = result.booster.predict(validation.select(features))
    per_era = frame.groupby("era").apply(
        lambda d: numerai_corr(d[["prediction"]], d["target"])["prediction"])
    assert np.isclose(result.metrics["corr_mean"], per_era.mean(), rtol=1e-6)
    assert np.isclose(result.metrics["corr_std"], per_era.std(ddof=0), rtol=1e-6)
    assert result.metrics["eras"] == len(per_era)


def test_loading_verifies_the_digest(trained, tmp_path):
    _, result = trained
    model = load_model(result.model_dir)
    assert model.digest == json.loads((result.model_dir / MANIFEST).read_text())["digest"]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(result.model_dir, target)
        return target

    flipped = copy("flipped")
    data = bytearray((flipped / "model.txt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "model.txt").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="model.txt does not match"):
        load_model(flipped)

    deleted = copy("deleted")
    (deleted / "features.json").unlink()
    with pytest.raises(ModelIntegrityError, match="features.json is missing"):
        load_model(deleted)

    no_manifest = copy("no_manifest")
    (no_manifest / MANIFEST).unlink()
    with pytest.raises(ModelIntegrityError, match="manifest.json is missing"):
        verify_model_dir(no_manifest)

    relisted = copy("relisted")
    manifest = json.loads((relisted / MANIFEST).read_text())
    (relisted / "params.json").write_text("{}")
    manifest["files"]["params.json"] = sha256_file(relisted / "params.json")
    (relisted / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="digest"):
        load_model(relisted)


def test_same_seed_gives_the_same_model_text(settings):
    features = small_features(settings)
    train = load_train(settings.version_dir / "train.parquet", features)
    params = TrainParams(device="cpu", **QUICK)
    first = train_booster(train, features, "target", params, progress=False)
    second = train_booster(train, features, "target", params, progress=False)
    other_seed = train_booster(train, features, "target", TrainParams(
        device="cpu", seed=7, **QUICK), progress=False)
    assert first.model_to_string() == second.model_to_string()
    assert first.model_to_string() != other_seed.model_to_string()


@pytest.mark.skipif(gpu_problem() is None, reason="this machine has a GPU LightGBM can use")
def test_gpu_request_falls_back_to_cpu_with_one_warning(settings):
    features = small_features(settings)
    train = load_train(settings.version_dir / "train.parquet", features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        booster = train_booster(train, features, "target", TrainParams(device="gpu", **QUICK),
                                progress=False)
    fallbacks = [w for w in caught if issubclass(w.category, GpuFallbackWarning)]
    assert len(fallbacks) == 1 and "training on the CPU" in str(fallbacks[0].message)
    assert [w for w in caught if w not in fallbacks] == []
    assert booster.num_trees() == 50 and "[device_type: cpu]" in booster.model_to_string()


def test_dataset_is_built_from_the_int8_columns_without_a_float_copy(settings):
    features = small_features(settings)
    train = load_train(settings.version_dir / "train.parquet", features)
    assert set(train.select(features).dtypes) == {pl.Int8}
    dataset = training_dataset(train, features, "target", TrainParams(device="cpu"))
    table = dataset.data
    assert isinstance(table, pa.Table) and set(table.schema.types) == {pa.int8()}
    # One byte per cell plus validity bitmaps: nothing was widened on the way.
    assert table.nbytes <= train.height * len(features) * 1.2
    assert table.column(0).chunk(0).buffers()[1].address == \
        train[features[0]].to_arrow().buffers()[1].address


def test_ensemble_loads_and_rank_averages_its_members(settings, tmp_path):
    features = small_features(settings)
    first = train_and_save(settings, TrainParams(device="cpu", **QUICK), tmp_path / "a",
                           progress=False)
    second = train_and_save(settings, TrainParams(device="cpu", seed=3, **QUICK),
                            tmp_path / "b", target="target", progress=False)
    folder = save_ensemble_dir(tmp_path / "ens", [first.model_dir, second.model_dir], [1, 3],
                               metrics={"corr_mean": 0.0}, info={"target": "target"})
    ensemble = load_model(folder)
    assert ensemble.kind == "ensemble" and ensemble.features == features
    validation = load_validation(settings.version_dir / "validation.parquet", features)
    eras = validation["era"].to_numpy()
    expected = (0.25 * rank_within(first.booster.predict(validation.select(features)), eras)
                + 0.75 * rank_within(second.booster.predict(validation.select(features)), eras))
    assert np.allclose(ensemble.predict(validation), expected)
    assert np.allclose(ensemble.predict(validation.to_pandas()), expected)


def test_live_loading_keeps_ids_and_tolerates_a_missing_feature(settings, tournament_spec):
    features = small_features(settings)
    live = load_live(settings.version_dir / "live.parquet", [*features, "feature_not_there"])
    assert live.columns[:2] == ["id", "era"] and live.columns[-len(features):] == features
    assert live.height == live["id"].n_unique() == tournament_spec.live_rows
