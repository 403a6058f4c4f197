"""The model registry: the local backend for real (crashes and concurrent promotions included),
W&B logging for real in offline mode, and W&B's server side against a stand-in for `wandb.Api`."""
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import lightgbm as lgb
import matplotlib
import numpy as np
import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from numerai_nb.config import ConfigError, ModelIntegrityError, RegistryError, Settings
from numerai_nb.model import save_model_dir, verify_model_dir
from numerai_nb.registry import (
    LocalRegistry,
    PromotionRule,
    WandbRegistry,
    attach_report,
    log_run_results,
    open_registry,
    register_trained_model,
    registry_table,
    start_wandb_run,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FEATURES = [f"feature_{i}" for i in range(6)]
ERAS = ["0575", "0576", "0577"]


@pytest.fixture(scope="module")
def booster():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(200, len(FEATURES))).astype("float64")
    y = (x[:, 0] + rng.normal(0, 1, 200)) / 8
    return lgb.train({"objective": "regression", "num_leaves": 4, "verbose": -1, "seed": 1},
                     lgb.Dataset(x, y, feature_name=FEATURES), num_boost_round=10)


@pytest.fixture
def make_model(tmp_path, booster):
    """Save a real ten-tree model directory with the given validation metrics."""
    def make(name, corr_mean, max_drawdown=0.05, eras=ERAS):
        metrics = {"corr_mean": corr_mean, "corr_std": 0.02, "corr_sharpe": corr_mean / 0.02,
                   "max_drawdown": max_drawdown, "eras": len(eras)}
        info = {"dataset_version": "v5.2", "feature_set": "small", "target": "target",
                "train_eras": ["0001", "0400"], "validation_eras": list(eras)}
        return save_model_dir(tmp_path / "models" / name, booster, FEATURES,
                              {"num_leaves": 4, "n_estimators": 10, "label": name}, metrics, {},
                              info)
    return make


@pytest.fixture
def registry(tmp_path):
    return LocalRegistry(tmp_path / "registry")


def _state(registry):
    return json.loads(registry.state_path.read_text())


# --- the local backend -----------------------------------------------------------------------

def test_local_log_resolve_promote_rollback(registry, make_model):
    first = registry.log_model(make_model("a", 0.020))
    assert (first.version, first.aliases) == ("v1", ("latest",))
    with pytest.raises(RegistryError, match="no version or alias 'prod'"):
        registry.resolve("prod")

    decision = registry.promote("latest")
    assert decision.promoted and decision.current is None and "no prod yet" in decision.reason
    second = registry.log_model(make_model("b", 0.025))
    assert second.version == "v2" and registry.get("latest").version == "v2"
    assert registry.get("prod").version == "v1"
    decision = registry.promote("latest")
    assert decision.promoted and (decision.current, decision.new_value) == ("v1", 0.025)
    assert decision.current_value == 0.020

    resolved = registry.resolve("prod")
    assert resolved == registry.versions_dir / "v2"
    assert verify_model_dir(resolved)["digest"] == second.digest == registry.get("v2").digest
    assert [(v.version, v.aliases) for v in registry.versions()] == [
        ("v1", ()), ("v2", ("latest", "prod"))]
    assert registry.versions()[1].headline() == {"corr_mean": 0.025, "corr_sharpe": 1.25,
                                                 "max_drawdown": 0.05}
    assert registry.alias_history("prod") == ["v1", "v2"]

    assert registry.rollback("prod").version == "v1"
    assert registry.resolve("prod") == registry.versions_dir / "v1"
    assert registry.get("latest").version == "v2"
    with pytest.raises(RegistryError, match="no earlier holder"):
        registry.rollback("prod")
    assert registry.set_alias("staging", "v2").aliases == ("latest", "staging")
    with pytest.raises(RegistryError, match="no such version"):
        registry.set_alias("prod", "v9")
    with pytest.raises(RegistryError, match="not a version"):
        registry.set_alias("v2", "v1")

    actions = [(e["action"], e["alias"], e["version"]) for e in _state(registry)["events"]]
    assert ("rollback", "prod", "v1") in actions
    table = registry_table(registry)
    assert "| v1 | prod | 0.0200 | 1.0000 | 0.0500 |" in table
    assert "| v2 | latest, staging | 0.0250 |" in table


def test_logging_the_same_files_twice_gives_the_same_version(registry, make_model):
    folder = make_model("a", 0.02)
    assert registry.log_model(folder, aliases=()).version == "v1"
    again = registry.log_model(folder, aliases=("latest", "candidate"))
    assert again.version == "v1" and again.aliases == ("candidate", "latest")
    assert len(registry.versions()) == 1


def test_guard_refuses_worse_metrics_and_deeper_drawdown_and_force_overrides(registry,
                                                                           make_model):
    registry.log_model(make_model("prod", 0.020, max_drawdown=0.05), aliases=("prod",))
    worse = registry.log_model(make_model("worse", 0.019, max_drawdown=0.01))
    decision = registry.promote(worse.version)
    assert not decision.promoted and "worse than prod's" in decision.reason
    assert (decision.new_value, decision.current_value) == (0.019, 0.020)
    deeper = registry.log_model(make_model("deeper", 0.030, max_drawdown=0.08))
    decision = registry.promote(deeper.version)
    assert not decision.promoted and "larger than prod's" in decision.reason
    assert "| max_drawdown | 0.0800 | 0.0500 |" in decision.markdown()
    assert registry.get("prod").version == "v1"

    equal = registry.log_model(make_model("equal", 0.020, max_drawdown=0.05))
    assert registry.promote(equal.version).promoted
    assert registry.get("prod").version == equal.version

    decision = registry.promote(worse.version, force=True)
    assert decision.promoted and decision.forced and "forced although" in decision.reason
    assert registry.get("prod").version == worse.version
    # By corr_sharpe alone the deeper-drawdown model is better and drawdown is not guarded.
    decision = registry.promote(deeper.version, rule=PromotionRule("corr_sharpe", False))
    assert decision.promoted and decision.metric == "corr_sharpe"


def test_guard_refuses_metrics_from_other_eras_unless_forced(registry, make_model):
    registry.log_model(make_model("prod", 0.020), aliases=("prod",))
    other = registry.log_model(make_model("other", 0.050, eras=["0575", "0576", "0578"]))
    decision = registry.promote(other.version)
    assert not decision.promoted and decision.eras_match is False
    assert "validation eras differ" in decision.reason
    assert registry.get("prod").version == "v1"
    assert registry.promote(other.version, force=True).promoted
    assert registry.get("prod").version == other.version


def test_resolve_rejects_a_changed_file_and_a_swapped_folder(registry, make_model):
    registry.log_model(make_model("a", 0.02), aliases=("prod",))
    registry.log_model(make_model("b", 0.03))
    model_file = registry.versions_dir / "v1" / "model.txt"
    original = model_file.read_text()
    model_file.write_text(original.replace("Tree=0", "Tree=9"))
    with pytest.raises(ModelIntegrityError, match="model.txt"):
        registry.resolve("prod")
    model_file.write_text(original)
    shutil.rmtree(registry.versions_dir / "v1")
    shutil.copytree(registry.versions_dir / "v2", registry.versions_dir / "v1")
    with pytest.raises(RegistryError, match="registry recorded"):
        registry.resolve("prod")


def test_promotion_failing_at_the_alias_file_replace_keeps_old_prod(registry, make_model,
                                                                   monkeypatch):
    registry.log_model(make_model("a", 0.02), aliases=("latest", "prod"))
    registry.log_model(make_model("b", 0.03))
    before = registry.state_path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        registry.promote("latest")
    monkeypatch.undo()
    assert registry.state_path.read_bytes() == before
    assert registry.get("prod").version == "v1"
    assert sorted(p.name for p in registry.root.iterdir()) == [
        "registry.json", "registry.lock", "versions"]
    assert registry.promote("latest").promoted  # the lock was released


_CRASHING_CHILD = """
import os, signal, sys
from numerai_nb.registry import LocalRegistry
root, action, target, crash_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == crash_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
registry = LocalRegistry(root)
registry.promote(target, force=True) if action == "promote" else registry.log_model(target)
"""


def _crash(registry, action, target, crash_at):
    child = subprocess.run([sys.executable, "-c", _CRASHING_CHILD, str(registry.root), action,
                            str(target), str(crash_at)], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr


def test_process_killed_mid_promotion_and_mid_logging_leaves_a_consistent_registry(
        registry, make_model):
    """A real process is killed (SIGKILL) right before it replaces the alias file."""
    registry.log_model(make_model("a", 0.02), aliases=("latest", "prod"))
    registry.log_model(make_model("b", 0.01))
    before = registry.state_path.read_bytes()
    _crash(registry, "promote", "v2", crash_at=1)
    assert registry.state_path.read_bytes() == before
    assert registry.get("prod").version == "v1"
    assert registry.resolve("prod") == registry.versions_dir / "v1"

    # Killed after the version folder was renamed into place, before it was recorded.
    _crash(registry, "log", make_model("c", 0.03), crash_at=2)
    assert (registry.versions_dir / "v3").is_dir()
    assert [v.version for v in registry.versions()] == ["v1", "v2"]
    fourth = registry.log_model(make_model("d", 0.04))
    assert fourth.version == "v4" and registry.promote("latest").promoted
    assert registry.get("prod").version == "v4" and registry.alias_history() == ["v1", "v4"]


def _promote_in_child(root, version, barrier, results):
    import numerai_nb.registry as registry_module
    judge = registry_module.judge_promotion

    def slow_judge(*args, **kwargs):
        time.sleep(0.3)  # widen the read-decide-write window so the two overlap
        return judge(*args, **kwargs)

    registry_module.judge_promotion = slow_judge
    barrier.wait()
    results.put(LocalRegistry(root).promote(version).as_dict())


def test_two_processes_promoting_at_once_serialize(registry, make_model):
    registry.log_model(make_model("a", 0.020), aliases=("prod",))
    registry.log_model(make_model("b", 0.030))
    registry.log_model(make_model("c", 0.040))
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_promote_in_child,
                                args=(registry.root, version, barrier, results))
                for version in ("v2", "v3")]
    for child in children:
        child.start()
    decisions = {d["version"]: d for d in (results.get(timeout=30) for _ in children)}
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0

    # Whatever the order, the best model holds prod and each decision saw the real holder.
    assert registry.get("prod").version == "v3"
    assert decisions["v3"]["promoted"]
    if decisions["v2"]["promoted"]:
        assert decisions["v2"]["current"] == "v1" and decisions["v3"]["current"] == "v2"
        assert registry.alias_history() == ["v1", "v2", "v3"]
    else:
        assert decisions["v3"]["current"] == "v1" and decisions["v2"]["current"] == "v3"
        assert registry.alias_history() == ["v1", "v3"]
    assert [e["action"] for e in _state(registry)["events"]].count("set_alias") == len(
        registry.alias_history()) - 1


def test_open_registry_picks_the_backend_by_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    settings = Settings.from_env({"NUMERAI_NB_HOME": str(tmp_path),
                                  "NUMERAI_NB_PROMOTION_METRIC": "corr_sharpe"})
    local = open_registry(settings)
    assert isinstance(local, LocalRegistry) and local.root == tmp_path / "registry"
    assert local.rule == PromotionRule("corr_sharpe")
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key-0000")
    remote = open_registry(settings.replace(wandb_entity="team"))
    assert isinstance(remote, WandbRegistry)
    assert remote.collection == "team/numerai-nb/numerai-lgbm"


# --- W&B: logging for real, offline ----------------------------------------------------------

@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode with every folder it writes under tmp_path, and no key."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                 "WANDB_ARTIFACT_DIR"):
        (tmp_path / name.lower()).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("NUMERAI_SECRET_KEY", "numerai-secret-that-must-not-leak")
    return Settings.from_env({"NUMERAI_NB_HOME": str(tmp_path / "home")})


def _read_records(path):
    """The records of an offline run's `.wandb` file (a LevelDB-style log of protobufs)."""
    data = path.read_bytes()
    block, position, pending, records = 32768, 7, b"", []  # 7: the ":W&B" file header
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _offline_records(run_dir):
    """The records of a finished offline run, once W&B's service has written them all out."""
    path = next(Path(run_dir).glob("run-*.wandb"))
    deadline = time.monotonic() + 60  # `run.finish()` can return before the file is flushed
    while True:
        records = _read_records(path)
        if (records and records[-1].WhichOneof("record_type") == "exit"
                or time.monotonic() > deadline):
            return records
        time.sleep(0.1)


def _run_dirs(settings):
    return sorted((settings.home / "wandb" / "wandb").glob("offline-run-*"))


def test_wandb_training_run_logs_params_metrics_plots_report_and_model_offline(
        offline_wandb, make_model, tmp_path):
    settings = offline_wandb
    model_dir = make_model("a", 0.021)
    run = start_wandb_run(settings, "train", {"n_estimators": 10, "feature_set": "small"})
    figure, axis = plt.subplots()
    axis.plot([0.01, 0.03, 0.02])
    log_run_results(run, json.loads((model_dir / "metrics.json").read_text()),
                    {"per_era_corr": figure})
    report = tmp_path / "train.html"
    report.write_text("<html><body><h1>Training report</h1></body></html>")
    attach_report(run, report)
    version, decision = register_trained_model(settings, model_dir, run=run)
    run.finish()
    local = LocalRegistry(settings.registry_dir)
    assert decision.promoted and local.get("prod").version == version.version == "v1"

    (run_dir,) = _run_dirs(settings)
    assert (run_dir / "files" / "train.html").read_text().startswith("<html>")
    assert list((run_dir / "files" / "media" / "images").glob("per_era_corr_*.png"))
    assert list((run_dir / "files" / "media" / "html").glob("report_*.html"))
    records = _offline_records(run_dir)
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    manifest = verify_model_dir(model_dir)
    assert (artifact.name, artifact.type) == ("numerai-lgbm", "model")
    assert list(artifact.aliases) == ["latest"]
    metadata = json.loads(artifact.metadata)
    assert metadata["digest"] == manifest["digest"]
    assert metadata["metrics"]["corr_mean"] == 0.021
    assert metadata["validation_eras"] == {"validation_eras": ERAS, "eras": 3}
    entries = {e.path: Path(e.local_path) for e in artifact.manifest.contents}
    assert sorted(entries) == sorted([*manifest["files"], "manifest.json"])
    for name, sha256 in manifest["files"].items():
        assert hashlib.sha256(entries[name].read_bytes()).hexdigest() == sha256
    summary = {item.key: item.value_json for r in records
               if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert json.loads(summary["validation/corr_mean"]) == 0.021
    assert json.loads(summary["promotion/promoted"]) is True
    assert json.loads(summary["promotion/reason"]) == "there is no prod yet"
    config = {item.key: item.value_json for r in records
              if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert json.loads(config["n_estimators"]) == 10
    assert json.loads(config["home"]) == str(settings.home)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"numerai-secret-that-must-not-leak" not in path.read_bytes(), path


def test_wandb_run_refuses_a_config_key_named_like_a_secret(offline_wandb):
    with pytest.raises(ConfigError, match="name secrets"):
        start_wandb_run(offline_wandb, "train", {"wandb_api_key": "x"})


# --- W&B: the server side, against a stand-in for wandb.Api ----------------------------------

class StandInArtifact:
    """A logged artifact as `wandb.Api().artifact(...)` returns it: aliases and metadata
    editable, `.save()` sends them to the stand-in server, `.download()` copies the files."""

    def __init__(self, server, version, aliases, metadata, files):
        self._server, self.version, self.files = server, version, files
        self.aliases, self.metadata, self.created_at = list(aliases), metadata, "2026-12-03"

    def save(self):
        self._server.save(self)

    def download(self, root):
        for name, path in self.files.items():
            shutil.copyfile(path, Path(root) / name)
        return str(root)


class StandInServer:
    """Stands in for the W&B server behind `wandb.Api`: it receives what `wandb sync` would upload
    from offline runs, numbers versions from v0, and keeps each alias unique in a collection."""

    def __init__(self):
        self.artifacts = []

    def sync(self, run_dir):
        for record in _offline_records(run_dir):
            if record.WhichOneof("record_type") != "artifact":
                continue
            artifact = record.artifact
            files = {e.path: Path(e.local_path) for e in artifact.manifest.contents}
            logged = StandInArtifact(self, f"v{len(self.artifacts)}", [],
                                     json.loads(artifact.metadata), files)
            self.artifacts.append(logged)
            logged.aliases = [*artifact.aliases, "latest"]
            self.save(logged)

    def save(self, saved):
        stored = next(a for a in self.artifacts if a.version == saved.version)
        stored.aliases, stored.metadata = list(dict.fromkeys(saved.aliases)), dict(saved.metadata)
        for other in self.artifacts:
            if other is not stored:
                other.aliases = [a for a in other.aliases if a not in stored.aliases]


class StandInApi:
    """The part of `wandb.Api` the registry calls: `artifact(name, type)` and `artifacts(...)`."""

    def __init__(self, server, collection):
        self.server, self.collection, self.calls = server, collection, []

    def artifact(self, name, type=None):
        self.calls.append(name)
        collection, ref = name.rsplit(":", 1)
        assert (collection, type) == (self.collection, "model")
        for stored in self.server.artifacts:
            if ref == stored.version or ref in stored.aliases:
                # Each call returns a fresh object, as the real client does.
                return StandInArtifact(self.server, stored.version, stored.aliases,
                                       dict(stored.metadata), stored.files)
        raise wandb.errors.CommError(f"artifact {name} not found")

    def artifacts(self, type_name, name):
        assert (type_name, name) == ("model", self.collection)
        return [self.artifact(f"{name}:{a.version}", "model") for a in self.server.artifacts]


def test_wandb_registry_resolve_promote_rollback_against_a_stand_in_for_wandb_api(
        offline_wandb, make_model):
    """Logging runs for real offline; listing, resolving and moving aliases need W&B's server,
    so they run against a stand-in at the `wandb.Api` boundary fed by the offline run."""
    settings = offline_wandb.replace(wandb_entity="team")
    run = start_wandb_run(settings, "train")
    registry = WandbRegistry(settings)
    for name, corr_mean in (("a", 0.020), ("b", 0.030), ("c", 0.010)):
        logged = registry.log_model(make_model(name, corr_mean), run=run)
        assert logged.version is None and logged.aliases == ("latest",)
    run.finish()
    server = StandInServer()
    server.sync(_run_dirs(settings)[0])
    api = StandInApi(server, "team/numerai-nb/numerai-lgbm")
    registry = WandbRegistry(settings, api=api)

    assert [(v.version, v.aliases) for v in registry.versions()] == [
        ("v0", ()), ("v1", ()), ("v2", ("latest",))]
    assert registry.holder("prod") is None and registry.alias_history("prod") == []
    assert registry.promote("v0").promoted
    decision = registry.promote("v1")
    assert decision.promoted and decision.current == "v0"
    assert [a.version for a in server.artifacts if "prod" in a.aliases] == ["v1"]
    refused = registry.promote("latest")
    assert not refused.promoted and "worse than prod's" in refused.reason
    assert registry.alias_history("prod") == ["v0", "v1"]

    path = registry.resolve("prod")
    assert path == settings.home / "wandb-artifacts" / "numerai-lgbm-v1"
    assert verify_model_dir(path)["digest"] == registry.get("v1").digest
    assert registry.rollback("prod").version == "v0"
    assert [a.version for a in server.artifacts if "prod" in a.aliases] == ["v0"]
    assert registry.alias_history("prod") == ["v0"]
    with pytest.raises(RegistryError, match="no earlier holder"):
        registry.rollback("prod")
    assert registry.resolve("prod") == settings.home / "wandb-artifacts" / "numerai-lgbm-v0"
    with pytest.raises(RegistryError, match="no version or alias 'staging'"):
        registry.resolve("staging")

    # A download that does not match the logged digest is refused and leaves no folder.
    server.artifacts[2].metadata["digest"] = "0" * 64
    with pytest.raises(RegistryError, match="digest other than the one logged"):
        registry.resolve("v2")
    assert not (settings.home / "wandb-artifacts" / "numerai-lgbm-v2").exists()
    assert "| v1 | - | 0.0300 |" in registry_table(registry)
