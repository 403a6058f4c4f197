"""Inference against the sandbox tournament: the real numerapi client over loopback, a real
LightGBM model in a real local registry, the gates, the submission ledger and the run outputs."""
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import pandas as pd
import polars as pl
import pytest
from numerai_tools.submissions import validate_submission_numerai

from numerai_nb.config import Settings
from numerai_nb.data import feature_names, load_feature_metadata, load_train, load_validation
from numerai_nb.inference import SubmissionLedger, run_inference
from numerai_nb.model import prediction_stats, reference_stats, save_model_dir
from numerai_nb.registry import LocalRegistry
from numerai_nb.sandbox import SandboxSpec, make_tournament

FEATURE_SET = "small"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 30-tree model trained on the tournament every default sandbox serves (same spec, seed)."""
    folder = make_tournament(tmp_path_factory.mktemp("tournament"), SandboxSpec())
    features = feature_names(load_feature_metadata(folder / "features.json"), FEATURE_SET)
    train = load_train(folder / "train.parquet", features, every_nth_era=1)
    validation = load_validation(folder / "validation.parquet", features, ("target",),
                                 train["era"].max(), embargo_eras=0)
    params = {"objective": "regression", "num_leaves": 8, "learning_rate": 0.1,
              "colsample_bytree": 0.8, "seed": 1, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(train.select(features).to_arrow(),
                                            train["target"].to_numpy(), feature_name=features),
                        num_boost_round=30)
    scores = booster.predict(validation.select(features).to_numpy())
    reference = {"features": reference_stats(train, features),
                 "predictions": prediction_stats(scores)}
    info = {"dataset_version": "v5.2", "feature_set": FEATURE_SET, "target": "target"}
    return save_model_dir(tmp_path_factory.mktemp("model") / "model", booster, features,
                          params, {"corr_mean": 0.02}, reference, info)


@dataclass
class Week:
    settings: Settings
    sandbox: object
    registry: LocalRegistry
    features: list
    runs: Path

    def run(self, name: str, settings: Settings | None = None, **options):
        return run_inference(settings or self.settings, self.runs / name,
                             registry=self.registry, **options)

    @property
    def live_path(self) -> Path:
        version = self.settings.dataset_version
        return self.sandbox.tournament.dataset_path(self.sandbox.round_number,
                                                    f"{version}/live.parquet")

    def serve_live(self, change):
        """Replace the live file the sandbox serves this round with `change(frame)`."""
        frame = pl.read_parquet(self.live_path)
        change(frame).write_parquet(self.live_path)

    def live_ids(self) -> list[str]:
        return pl.read_parquet(self.live_path)["id"].to_list()

    def uploads(self) -> list:
        return [r for r in self.sandbox.requests if r["kind"] == "upload"]


@pytest.fixture
def week(tmp_path, monkeypatch, sandbox, sandbox_env, model_dir):
    """Settings pointing at the sandbox, and a local registry whose `prod` is the model."""
    monkeypatch.setenv("NUMERAI_FEATURE_SET", FEATURE_SET)
    monkeypatch.setenv("NUMERAI_NB_GATE_MIN_ROWS", "100")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    settings = Settings.from_env()
    registry = LocalRegistry(settings.registry_dir)
    registry.log_model(model_dir, aliases=("latest", "prod"))
    features = json.loads((model_dir / "features.json").read_text())
    return Week(settings, sandbox, registry, features, tmp_path / "runs")


def _outputs(run_dir: Path) -> tuple[dict, str]:
    return (json.loads((run_dir / "result.json").read_text()),
            (run_dir / "summary.md").read_text())


def test_a_clean_round_is_submitted_once_as_a_valid_csv_covering_every_live_id(week):
    result = week.run("first")
    assert (result.status, result.exit_code, result.forced) == ("submitted", 0, False)
    assert result.model_version == "v1" and result.round == week.sandbox.round_number

    [received] = week.sandbox.submissions()
    assert received.model_name == week.settings.model_name
    assert received.submission_id == result.submission["submission_id"]
    csv = pd.read_csv(io.BytesIO(received.csv_bytes()))
    live_ids = pd.Series(week.live_ids())
    _, _, filtered, invalid = validate_submission_numerai(live_ids, csv)
    assert invalid == [] and len(filtered) == len(live_ids) == len(csv)
    assert set(csv["id"]) == set(live_ids)

    saved, summary = _outputs(week.runs / "first")
    assert saved["status"] == "submitted" and saved["exit_code"] == 0
    assert saved["submission"]["state"] == "submitted"
    assert "model version: v1" in summary and "| schema.ids | pass |" in summary

    again = week.run("second")
    assert (again.status, again.exit_code) == ("already_submitted", 0)
    assert "already submitted" in again.message
    assert len(week.sandbox.submissions()) == 1 and len(week.uploads()) == 1
    live_downloads = [r for r in week.sandbox.requests
                      if r["kind"] == "file" and r["name"].endswith("live.parquet")]
    assert len(live_downloads) == 1, "a submitted round is recognised before any download"


def _drop_feature(week):
    return lambda frame: frame.drop(week.features[0])


def _drift(week):
    return lambda frame: frame.with_columns(pl.col(week.features).clip(3, 4))


def _duplicate_ids(week):
    def change(frame):
        ids = frame["id"].to_list()
        return frame.with_columns(pl.Series("id", ids[:10] + ids[:frame.height - 10]))
    return change


def _no_rows(week):
    return lambda frame: frame.head(0)


@pytest.mark.parametrize("breakage, gate", [(_drop_feature, "schema.features"),
                                            (_drift, "drift.features"),
                                            (_duplicate_ids, "schema.ids"),
                                            (_no_rows, "schema.rows")])
def test_broken_live_data_fails_its_gate_with_exit_code_2_and_nothing_is_sent(week, breakage,
                                                                             gate):
    week.serve_live(breakage(week))
    result = week.run("broken")
    assert (result.status, result.exit_code) == ("gate_failed", 2)
    assert gate in result.failed_gates
    assert week.sandbox.submissions() == [] and week.uploads() == []
    assert SubmissionLedger.for_settings(week.settings).records() == []
    saved, summary = _outputs(week.runs / "broken")
    assert saved["exit_code"] == 2 and gate in saved["failed_gates"]
    assert f"| {gate} | **FAIL** |" in summary


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet PAR1"],
                         ids=["empty", "not-parquet"])
def test_an_empty_or_unreadable_live_file_fails_the_file_gate(week, content):
    week.live_path.write_bytes(content)
    result = week.run("unreadable")
    assert (result.status, result.exit_code, result.failed_gates) == ("gate_failed", 2,
                                                                      ["schema.file"])
    assert week.sandbox.submissions() == []


def test_a_dry_run_checks_everything_and_uploads_nothing(week):
    result = week.run("dry", dry_run=True)
    assert (result.status, result.exit_code) == ("dry_run", 0)
    assert result.failed_gates == [] and len(result.gates) == 14
    assert week.sandbox.submissions() == [] and week.uploads() == []
    csv = pd.read_csv(week.runs / "dry" / f"predictions_round_{result.round}.csv")
    assert sorted(csv["id"]) == sorted(week.live_ids())
    assert SubmissionLedger.for_settings(week.settings).records() == []


def test_force_submits_despite_a_failed_gate_and_records_the_override(week):
    week.serve_live(_drift(week))
    result = week.run("forced", force=True)
    assert (result.status, result.exit_code, result.forced) == ("submitted", 0, True)
    assert "drift.features" in result.failed_gates
    assert len(week.sandbox.submissions()) == 1
    [record] = SubmissionLedger.for_settings(week.settings).records()
    assert record["forced"] is True and "drift.features" in record["failed_gates"]
    saved, summary = _outputs(week.runs / "forced")
    assert saved["forced"] is True and "**forced**" in summary


RUN_ONE = """
import sys, time
from pathlib import Path
from numerai_nb.config import Settings
from numerai_nb.inference import run_inference
run_dir = Path(sys.argv[1])
run_dir.mkdir(parents=True)
while len(list(run_dir.parent.iterdir())) < 2:  # start together, once both have imported
    time.sleep(0.01)
print(run_inference(Settings.from_env(), run_dir).status)
"""


def test_two_runs_at_once_submit_once(week):
    """Two real processes run the same round together: one uploads, the other stops cleanly
    (on the lock, or on the receipt if it comes second)."""
    runs = [subprocess.Popen([sys.executable, "-c", RUN_ONE, str(week.runs / f"run{i}")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    outcomes = [run.communicate(timeout=120) for run in runs]
    statuses = sorted(out.strip().splitlines()[-1] for out, _ in outcomes)
    assert statuses == ["already_submitted", "submitted"], outcomes
    assert [run.returncode for run in runs] == [0, 0]
    assert len(week.sandbox.submissions()) == 1 and len(week.uploads()) == 1


def test_a_run_finding_the_round_locked_stops_without_uploading(week):
    ledger = SubmissionLedger.for_settings(week.settings)
    with ledger.lock(week.sandbox.round_number, week.settings.model_name):
        result = week.run("second")
    assert (result.status, result.exit_code) == ("already_submitted", 0)
    assert "already being submitted" in result.message
    assert week.sandbox.submissions() == [] and week.uploads() == []


def test_an_intent_without_receipt_stops_until_resubmit_is_asked(week):
    """A run killed between upload and record leaves only the intent: the next run must not
    guess; it stops with exit code 1 and uploads again only with resubmit."""
    first = week.run("first")
    ledger = SubmissionLedger.for_settings(week.settings)
    [record] = ledger.records()
    ledger.put({**record, "state": "uploading"})
    result = week.run("after-kill")
    assert (result.status, result.exit_code) == ("error", 1)
    assert "may have reached Numerai" in result.message
    assert len(week.sandbox.submissions()) == 1
    again = week.run("resubmit", resubmit=True)
    assert (again.status, again.exit_code) == ("submitted", 0)
    assert len(week.sandbox.submissions()) == 2
    [record] = ledger.records()
    assert record["previous"][0]["submission_id"] == first.submission["submission_id"]


def test_a_closed_round_is_an_error_and_nothing_is_sent(week):
    week.sandbox.close_round()
    result = week.run("closed")
    assert (result.status, result.exit_code) == ("error", 1)
    assert "closed" in result.message
    assert week.sandbox.submissions() == [] and week.uploads() == []
    saved, summary = _outputs(week.runs / "closed")
    assert saved["status"] == "error" and "exit code 1" in summary


def test_a_refused_upload_is_an_error_and_the_next_run_submits(week):
    week.sandbox.faults.refuse_upload = True
    result = week.run("refused")
    assert (result.status, result.exit_code) == ("error", 1)
    assert SubmissionLedger.for_settings(week.settings).records() == []
    week.sandbox.faults.reset()
    again = week.run("retry")
    assert (again.status, again.exit_code) == ("submitted", 0)
    assert len([s for s in week.sandbox.submissions() if s.path]) == 1


def test_a_bad_gate_setting_is_an_error_with_its_outputs_written(week, monkeypatch):
    monkeypatch.setenv("NUMERAI_NB_GATE_MAX_DRIFTED_SHARE", "3")
    result = week.run("bad-setting")
    assert (result.status, result.exit_code) == ("error", 1)
    assert "max_drifted_share" in result.message and week.sandbox.requests == []
    saved, _ = _outputs(week.runs / "bad-setting")
    assert saved["status"] == "error"


def test_an_unknown_model_name_stops_before_any_download(week, monkeypatch):
    monkeypatch.setenv("NUMERAI_MODEL_NAME", "not_my_model")
    result = week.run("unknown-model", settings=Settings.from_env())
    assert (result.status, result.exit_code) == ("error", 1)
    assert "not_my_model" in result.message and "sandbox_model" in result.message
    assert not [r for r in week.sandbox.requests if r["kind"] == "file"]
