"""The fault matrix of `nbs/14_faults.ipynb`, each row proved against real parts.

The sandbox serves the tournament from a thread of this process; the pipeline runs either here
(real numerapi over loopback, real LightGBM, the real local registry) or, where a process must
die at a precise point, in a child Python process that this test kills with SIGKILL. The
sandbox or the child holds at the critical point (a file appears, an event is awaited), so the
kill lands exactly there, then the next run is made and its outcome asserted: retried and
succeeded, or stopped with a clear error, the exit code of the inference contract (2 a gate
failed, 1 anything else), nothing submitted twice and no half-written file taken for a good one.
"""
import ast
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import polars as pl
import pyarrow.parquet as pq
import pytest
import requests

from numerai_nb.config import (
    DataError,
    ModelIntegrityError,
    NumeraiApiError,
    Settings,
    sha256_file,
)
from numerai_nb.inference import SubmissionLedger, run_inference
from numerai_nb.model import MANIFEST, directory_digest, load_model, verify_model_dir
from numerai_nb.numerai import NumeraiClient, RetryPolicy
from numerai_nb.registry import LocalRegistry
from numerai_nb.sandbox import SandboxRequestHandler, SandboxSpec, make_tournament
from numerai_nb.train import TrainParams, train_and_save

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "nbs" / "14_faults.ipynb"
FAST = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05)
QUICK = TrainParams(device="cpu", n_estimators=20, learning_rate=0.1, colsample_bytree=0.5,
                    num_threads=1)
FEATURE_SET = "small"


# --- shared pieces ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One model trained by the pipeline's own step on the tournament every default sandbox
    serves, with the settings (data folder included) it was trained with."""
    root = tmp_path_factory.mktemp("trained")
    settings = Settings.from_env({"NUMERAI_NB_HOME": str(root / "home"),
                                  "NUMERAI_DATA_DIR": str(root / "data")},
                                 feature_set=FEATURE_SET, lgbm_device="cpu")
    make_tournament(settings.version_dir, SandboxSpec())
    result = train_and_save(settings, QUICK, root / "model", every_nth_era=1, progress=False)
    return settings, result.model_dir


@dataclass
class Week:
    """A week of inference: settings pointing at the sandbox, `prod` in a local registry."""
    settings: Settings
    sandbox: object
    registry: LocalRegistry
    features: list
    runs: Path

    def client(self, **changes) -> NumeraiClient:
        return NumeraiClient.from_settings(self.settings.replace(**changes), require_auth=True,
                                           retry=FAST, show_progress=False)

    def run(self, name: str, client=None, **options):
        return run_inference(self.settings, self.runs / name, registry=self.registry,
                             client=client or self.client(), **options)

    @property
    def live_path(self) -> Path:
        return self.sandbox.tournament.dataset_path(self.sandbox.round_number,
                                                    f"{self.settings.dataset_version}/live.parquet")

    @property
    def cached_live(self) -> Path:
        return self.settings.version_dir / f"live_{self.sandbox.round_number}.parquet"

    def serve_live(self, change) -> None:
        """Serve `change(live frame)` as this round's live file."""
        change(pl.read_parquet(self.live_path)).write_parquet(self.live_path)

    def uploads(self) -> list:
        return [r for r in self.sandbox.requests if r["kind"] == "upload"]

    def ledger(self) -> list:
        return SubmissionLedger.for_settings(self.settings).records()

    def assert_nothing_sent(self) -> None:
        assert self.sandbox.submissions() == [] and self.uploads() == []
        assert self.ledger() == []


@pytest.fixture
def week(sandbox, sandbox_env, tmp_path, monkeypatch, trained) -> Week:
    monkeypatch.setenv("NUMERAI_FEATURE_SET", FEATURE_SET)
    monkeypatch.setenv("NUMERAI_NB_GATE_MIN_ROWS", "100")
    monkeypatch.setenv("LGBM_DEVICE", "cpu")
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    settings = Settings.from_env()
    registry = LocalRegistry(settings.registry_dir)
    registry.log_model(trained[1], aliases=("latest", "prod"))
    features = json.loads((trained[1] / "features.json").read_text())
    return Week(settings, sandbox, registry, features, tmp_path / "runs")


def saved_result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def wait_for(condition, what: str, child: subprocess.Popen | None = None, limit: float = 120):
    """Poll until `condition()` holds; fail naming `what` if the child died or it never did."""
    deadline = time.monotonic() + limit
    while not condition():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"the child exited ({child.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def start_child(code: str, *args, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A Python child process running `code` with `args`, its output kept in `log`."""
    out = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=log.parent)
    finally:
        out.close()


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL


def overwrite_pages(path: Path) -> None:
    """Overwrite the data pages of every column chunk, same size, footer intact: a file that
    reads as parquet by its metadata but whose contents are corrupt."""
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            chunk = meta.row_group(group).column(column)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            data[start + 8:start + chunk.total_compressed_size - 8] = \
                b"\xa5" * (chunk.total_compressed_size - 16)
    path.write_bytes(bytes(data))


# --- network --------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["server_errors", "rate_limited"])
def test_a_burst_of_5xx_or_429_during_inference_is_retried_and_submits_once(week, fault):
    setattr(week.sandbox.faults, fault, 2)
    result = week.run("burst")
    assert (result.status, result.exit_code) == ("submitted", 0)
    assert len(week.sandbox.submissions()) == 1
    faulted = [r for r in week.sandbox.requests if r["kind"] == "graphql" and r["fault"]]
    assert len(faulted) == 2


def _hang(week, monkeypatch):
    week.sandbox.faults.hang_seconds = 60
    return week.client(http_timeout=0.5)


def _refused(week, monkeypatch):
    client = week.client()
    week.sandbox.stop()
    return client


def _bad_credentials(week, monkeypatch):
    monkeypatch.setenv("NUMERAI_SECRET_KEY", "guessed-secret-value")
    return week.client()


def _unknown_model(week, monkeypatch):
    week.settings = week.settings.replace(model_name="not_this_accounts_model")
    return week.client()


def _persistent_5xx(week, monkeypatch):
    week.sandbox.faults.server_errors = 1000
    return week.client()


@pytest.mark.parametrize("fault, says", [
    (_hang, "no reply from"), (_refused, "Connection refused"),
    (_bad_credentials, "Check NUMERAI_PUBLIC_ID and NUMERAI_SECRET_KEY"),
    (_unknown_model, "'not_this_accounts_model' is not one of this account's models"),
    (_persistent_5xx, "HTTP 503")], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_network_faults_stop_inference_with_exit_code_1_and_nothing_submitted(week, monkeypatch,
                                                                            fault, says):
    client = fault(week, monkeypatch)
    result = week.run("fault", client=client)
    assert (result.status, result.exit_code) == ("error", 1)
    assert says in result.message
    assert saved_result(week.runs / "fault")["exit_code"] == 1
    assert "exit code 1" in (week.runs / "fault" / "summary.md").read_text()
    week.assert_nothing_sent()
    assert "guessed-secret-value" not in (week.runs / "fault" / "result.json").read_text()


def test_a_download_corrupted_in_transit_is_never_kept_and_the_next_run_submits(week):
    """Same length, footer intact, data pages garbage: it looks like parquet by its metadata."""
    original = week.live_path.read_bytes()
    overwrite_pages(week.live_path)
    result = week.run("corrupt")
    assert (result.status, result.exit_code, result.failed_gates) == ("gate_failed", 2,
                                                                      ["schema.file"])
    assert not week.cached_live.exists(), "a corrupt download was kept as the round's live file"
    assert not [p for p in week.settings.version_dir.iterdir() if p.name.startswith(".")]
    week.assert_nothing_sent()

    week.live_path.write_bytes(original)
    again = week.run("clean")
    assert (again.status, again.exit_code) == ("submitted", 0)
    assert sha256_file(week.cached_live) == sha256_file(week.live_path)
    assert len(week.sandbox.submissions()) == 1


def test_dataset_names_from_the_api_that_leave_the_data_folder_are_refused(week, tmp_path,
                                                                         monkeypatch):
    """The sandbox lists (and serves) names that climb out of the data folder."""
    tournament = week.sandbox.tournament
    evil = ["v5.2/../../evil.parquet", "../../evil.parquet", "v5.2/../../../../tmp/evil.json"]
    listed, served = tournament.dataset_names, tournament.dataset_path
    monkeypatch.setattr(tournament, "dataset_names", lambda: [*listed(), *evil])
    monkeypatch.setattr(tournament, "dataset_path", lambda round_number, name: (
        tournament.data_dir / "features.json" if name in evil else served(round_number, name)))
    client = week.client()
    assert set(evil) <= set(client.list_datasets())
    for name in evil:
        with pytest.raises(DataError, match="outside"):
            client.download(name)
    paths = client.download_training_data(FEATURE_SET)
    version_dir = week.settings.version_dir.resolve()
    assert all(path.parent == version_dir for path in paths.values())
    assert not [p for p in tmp_path.rglob("evil*")] and not Path("/tmp/evil.json").exists()
    assert not [r for r in week.sandbox.requests if r["kind"] == "file" and "evil" in r["name"]]


def test_wandb_key_set_but_wandb_unreachable_stops_naming_wandb_and_submits_nothing(week,
                                                                                   tmp_path):
    """A real W&B client in a child process, pointed at a closed loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {"WANDB_API_KEY": "wandbfakekey" * 4, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port}",
           "WANDB_HTTP_TIMEOUT": "1", "WANDB_DIR": str(tmp_path / "wandb"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    child = start_child(INFERENCE_CHILD, week.runs / "wandb", log=tmp_path / "wandb.log", env=env)
    assert child.wait(timeout=240) == 1, (tmp_path / "wandb.log").read_text()
    result = saved_result(week.runs / "wandb")
    assert result["status"] == "error" and "W&B cannot be reached" in result["message"]
    assert f"127.0.0.1:{closed_port}" in result["message"]
    assert result["model_version"] is None and result["round"] is None
    week.assert_nothing_sent()
    assert not [r for r in week.sandbox.requests if r["kind"] == "file"]


# --- interruption -----------------------------------------------------------------------------

INFERENCE_CHILD = """
import sys
from numerai_nb.config import Settings
from numerai_nb.inference import run_inference
sys.exit(run_inference(Settings.from_env(), sys.argv[1]).exit_code)
"""

DOWNLOAD_CHILD = """
from numerai_nb.config import Settings
from numerai_nb.numerai import NumeraiClient
NumeraiClient.from_settings(Settings.from_env(), show_progress=False).download("train.parquet")
"""


class TestInterruptedDownloads:
    @pytest.fixture
    def tournament_spec(self):
        """train.parquet of a few MiB, so the child writes part of it (1 MiB chunks)."""
        return SandboxSpec(rows_per_era=1000, train_eras=6, validation_eras=3, unscored_eras=1,
                           n_all=900, n_medium=40, n_small=12, live_rows=50)

    def test_killed_during_a_download_keeps_no_file_as_good_and_the_next_run_resumes(
            self, sandbox, sandbox_env, tmp_path, monkeypatch):
        source = sandbox.tournament.data_dir / "train.parquet"
        half_sent, release, original = threading.Event(), threading.Event(), \
            SandboxRequestHandler.do_GET

        def stalling_get(handler):
            name = unquote(urlsplit(handler.path).path).rsplit("/", 1)[-1]
            if name != "train.parquet" or handler.headers.get("Range") or half_sent.is_set():
                return original(handler)
            body = source.read_bytes()
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[:len(body) // 2])
            handler.wfile.flush()
            half_sent.set()
            release.wait(120)
            handler.close_connection = True

        monkeypatch.setattr(SandboxRequestHandler, "do_GET", stalling_get)
        settings = Settings.from_env()
        partial = settings.version_dir / ".train.parquet.download.temp"
        child = start_child(DOWNLOAD_CHILD, log=tmp_path / "download.log")
        try:
            wait_for(lambda: partial.exists() and partial.stat().st_size >= 2**20,
                     "a partial download on disk", child)
            kill(child)
        finally:
            release.set()
        assert not (settings.version_dir / "train.parquet").exists()
        kept = partial.stat().st_size
        assert 0 < kept < source.stat().st_size

        path = NumeraiClient.from_settings(settings, retry=FAST, show_progress=False).download(
            "train.parquet")
        assert sha256_file(path) == sha256_file(source)
        assert [r["range_start"] for r in sandbox.requests if r["kind"] == "file"][-1] == kept
        assert [p.name for p in settings.version_dir.iterdir()] == ["train.parquet"]


    def test_a_resume_answered_with_the_whole_file_is_never_kept_as_good(self, sandbox,
                                                                         sandbox_env,
                                                                         monkeypatch):
        """The first transfer is cut short; the resume reaches a server (a proxy, a CDN) that
        ignores `Range` and sends the whole file again, as HTTP allows."""
        source, original = sandbox.tournament.data_dir / "train.parquet", \
            SandboxRequestHandler.do_GET

        def range_ignoring_get(handler):
            if handler.headers.get("Range"):
                del handler.headers["Range"]
            return original(handler)

        monkeypatch.setattr(SandboxRequestHandler, "do_GET", range_ignoring_get)
        sandbox.faults.truncate_download = 1
        settings = Settings.from_env()
        client = NumeraiClient.from_settings(settings, retry=FAST, show_progress=False)
        try:
            path = client.download("train.parquet")
        except (DataError, NumeraiApiError):
            path = None
        if path is not None:
            assert sha256_file(path) == sha256_file(source)
        assert [p.name for p in settings.version_dir.iterdir()
                if not p.name.startswith(".")] in (["train.parquet"], [])
        again = client.download("train.parquet")
        assert sha256_file(again) == sha256_file(source)

    def test_a_resumed_download_verifies_tls_and_keeps_the_http_timeout(self, sandbox,
                                                                        sandbox_env,
                                                                        monkeypatch):
        """numerapi resumes a partial file with `verify=False` (on Numerai's HTTPS file store
        that accepts any certificate for the rest of the file) and a fixed 600 s timeout."""
        calls, real_send = [], requests.Session.send

        def recording_send(session, request, **kwargs):
            calls.append((request.headers.get("Range"), kwargs.get("verify"),
                          kwargs.get("timeout")))
            return real_send(session, request, **kwargs)

        monkeypatch.setattr(requests.Session, "send", recording_send)
        sandbox.faults.truncate_download = 1
        settings = Settings.from_env().replace(http_timeout=5)
        NumeraiClient.from_settings(settings, retry=FAST, show_progress=False).download(
            "train.parquet")
        assert [ranged for ranged, _, _ in calls if ranged], "the download was not resumed"
        assert False not in [verify for _, verify, _ in calls], calls
        limits = [max(t) if isinstance(t, tuple) else t for _, _, t in calls]
        assert None not in limits and max(limits) <= 5, calls


TRAIN_CHILD = """
import os, sys, time
from pathlib import Path
import numerai_nb.model as model
from numerai_nb.config import Settings
from numerai_nb.train import TrainParams, train_and_save
out, point, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def hold():
    marker.write_text(point)
    time.sleep(600)
if point == "files_written":
    model.directory_digest = lambda files: hold()
else:
    real_replace = os.replace
    def replace(src, dst):
        if Path(dst) == out:
            hold()
        return real_replace(src, dst)
    os.replace = replace
params = TrainParams(device="cpu", n_estimators=20, learning_rate=0.1, colsample_bytree=0.5,
                     num_threads=1)
train_and_save(Settings.from_env(feature_set="small", lgbm_device="cpu"), params, out,
               every_nth_era=1, progress=False)
"""


@pytest.mark.parametrize("existing, point", [(False, "files_written"), (True, "rename")],
                         ids=["new-before-manifest", "replace-mid-swap"])
def test_killed_while_writing_the_model_directory_leaves_no_model_taken_for_good(
        trained, tmp_path, existing, point):
    settings, good = trained
    out = tmp_path / "models" / "m1"
    if existing:
        shutil.copytree(good, out)
    env = {"NUMERAI_NB_HOME": str(settings.home), "NUMERAI_DATA_DIR": str(settings.data_dir)}
    marker = tmp_path / "reached"
    child = start_child(TRAIN_CHILD, out, point, marker, log=tmp_path / "train.log", env=env)
    wait_for(marker.exists, f"the child at {point}", child)
    kill(child)

    if out.exists():  # the old model, whole, or nothing: never a half-written one
        assert verify_model_dir(out)["digest"] == verify_model_dir(good)["digest"]
    else:
        with pytest.raises(ModelIntegrityError, match="does not exist"):
            load_model(out)
    registry = LocalRegistry(tmp_path / "registry")
    for leftover in [p for p in out.parent.iterdir() if p.name.startswith(".")]:
        if point == "files_written":
            with pytest.raises(ModelIntegrityError):
                registry.log_model(leftover)
    assert registry.versions() == []

    again = train_and_save(settings, QUICK, out, every_nth_era=1, progress=False)
    model = load_model(again.model_dir)
    assert model.digest == verify_model_dir(out)["digest"]
    assert not list(out.parent.glob(f".{out.name}.old.*"))  # a set-aside copy is not left over
    assert registry.log_model(out, aliases=("latest",)).version == "v1"


def _stall_upload(week, monkeypatch):
    """Hold the upload PUT: the intent is recorded, nothing has reached the sandbox yet."""
    reached, release, original = threading.Event(), threading.Event(), \
        SandboxRequestHandler.do_PUT

    def held_put(handler):
        if not reached.is_set():  # the first upload only
            reached.set()
            release.wait(120)
        return original(handler)

    monkeypatch.setattr(SandboxRequestHandler, "do_PUT", held_put)
    return reached, release


def _stall_after_record(week, monkeypatch):
    """Let the sandbox accept the submission, then hold its reply: Numerai has it, the
    pipeline does not know yet."""
    reached, release, original = threading.Event(), threading.Event(), \
        week.sandbox.record_submission

    def held_record(*args, **kwargs):
        submission_id = original(*args, **kwargs)
        if not reached.is_set():  # the first submission only
            reached.set()
            release.wait(120)
        return submission_id

    monkeypatch.setattr(week.sandbox, "record_submission", held_record)
    return reached, release


@pytest.mark.parametrize("stall, received", [(_stall_upload, 0), (_stall_after_record, 1)],
                         ids=["during-upload", "after-numerai-recorded-it"])
def test_killed_between_upload_and_record_the_next_run_never_submits_twice(
        week, tmp_path, monkeypatch, stall, received):
    reached, release = stall(week, monkeypatch)
    child = start_child(INFERENCE_CHILD, week.runs / "killed", log=tmp_path / "infer.log")
    try:
        wait_for(reached.is_set, "the submission in flight", child)
        kill(child)
    finally:
        release.set()
    assert len(week.sandbox.submissions()) == received
    [intent] = week.ledger()
    assert intent["state"] == "uploading"

    after = week.run("after-kill")
    assert (after.status, after.exit_code) == ("error", 1)
    assert "may have reached Numerai" in after.message and "resubmit" in after.message
    assert len(week.sandbox.submissions()) == received
    again = week.run("again")
    assert (again.status, again.exit_code) == ("error", 1)
    assert len(week.sandbox.submissions()) == received

    asked = week.run("resubmit", resubmit=True)
    assert (asked.status, asked.exit_code) == ("submitted", 0)
    assert len(week.sandbox.submissions()) == received + 1


def test_two_inference_runs_for_one_round_at_once_one_submits_the_other_stops_cleanly(
        week, tmp_path, monkeypatch):
    """Two real processes; the first is held at its upload while the second runs to its end."""
    reached, release = _stall_upload(week, monkeypatch)
    first = start_child(INFERENCE_CHILD, week.runs / "first", log=tmp_path / "first.log")
    try:
        wait_for(reached.is_set, "the first run's upload", first)
        second = start_child(INFERENCE_CHILD, week.runs / "second", log=tmp_path / "second.log")
        assert second.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()
    finally:
        release.set()
    assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()
    outcomes = {saved_result(week.runs / name)["status"] for name in ("first", "second")}
    assert outcomes == {"submitted", "already_submitted"}
    assert "already being submitted" in saved_result(week.runs / "second")["message"]
    assert len(week.sandbox.submissions()) == 1 and len(week.uploads()) == 1
    [record] = week.ledger()
    assert record["state"] == "submitted"


# --- input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["cut_short", "pages_overwritten"])
def test_a_cached_live_file_corrupted_on_disk_is_downloaded_again(week, damage):
    checked = week.run("dry", dry_run=True)
    assert checked.status == "dry_run" and week.cached_live.exists()
    if damage == "cut_short":
        week.cached_live.write_bytes(week.cached_live.read_bytes()[:-200])
    else:
        overwrite_pages(week.cached_live)
    result = week.run("after-damage")
    assert (result.status, result.exit_code) == ("submitted", 0), result.message
    assert sha256_file(week.cached_live) == sha256_file(week.live_path)
    [received] = week.sandbox.submissions()
    dry_csv = week.runs / "dry" / f"predictions_round_{checked.round}.csv"
    assert received.csv_bytes() == dry_csv.read_bytes()


def _first(week):
    return week.features[0]


LIVE_BREAKAGES = {
    "wrong_type": (lambda w: pl.col(_first(w)).cast(pl.String).alias(_first(w)),
                   "schema.values"),
    "out_of_range": (lambda w: (pl.col(_first(w)) + 5).alias(_first(w)), "schema.values"),
    "fractional": (lambda w: (pl.col(_first(w)).cast(pl.Float64) + 0.5).alias(_first(w)),
                   "schema.values"),
    "all_nan": (lambda w: pl.lit(None, pl.Int8).alias(_first(w)),
                "quality.missing_per_feature"),
    "empty_ids": (lambda w: pl.when(pl.int_range(pl.len()) < 5).then(pl.lit(""))
                  .otherwise(pl.col("id")).alias("id"), "schema.ids"),
    "null_ids": (lambda w: pl.when(pl.int_range(pl.len()) < 5).then(None)
                 .otherwise(pl.col("id")).alias("id"), "schema.ids"),
}


@pytest.mark.parametrize("breakage", sorted(LIVE_BREAKAGES))
def test_live_data_with_wrong_values_or_ids_fails_its_gate_with_exit_code_2(week, breakage):
    change, gate = LIVE_BREAKAGES[breakage]
    week.serve_live(lambda frame: frame.with_columns(change(week)))
    result = week.run("broken")
    assert (result.status, result.exit_code) == ("gate_failed", 2)
    assert gate in result.failed_gates
    assert saved_result(week.runs / "broken")["exit_code"] == 2
    assert f"| {gate} | **FAIL** |" in (week.runs / "broken" / "summary.md").read_text()
    week.assert_nothing_sent()


def test_live_data_with_an_extra_feature_is_predicted_on_the_model_features_only(week):
    clean = week.run("clean", dry_run=True)
    week.sandbox.new_round()
    week.serve_live(lambda frame: frame.with_columns(
        pl.col(week.features[0]).alias("feature_new_in_a_later_version")))
    extra = week.run("extra")
    assert (extra.status, extra.exit_code) == ("submitted", 0)
    assert "schema.features" not in extra.failed_gates and clean.failed_gates == []
    [received] = week.sandbox.submissions()
    assert received.csv_bytes().decode().splitlines()[0] == "id,prediction"


def test_a_dataset_features_json_changed_since_training_does_not_change_the_inputs(week):
    """The tournament's feature sets reorder and the live columns come in another order: the
    model still reads its own feature list, by name, so its predictions are identical."""
    before = week.run("before", dry_run=True)
    features_json = week.sandbox.tournament.data_dir / "features.json"
    metadata = json.loads(features_json.read_text())
    metadata["feature_sets"] = {k: v[::-1] for k, v in metadata["feature_sets"].items()}
    features_json.write_text(json.dumps(metadata))
    week.serve_live(lambda frame: frame.select(frame.columns[::-1]))
    week.cached_live.unlink()
    after = week.run("after", dry_run=True)
    assert (after.status, after.failed_gates) == ("dry_run", [])
    name = f"predictions_round_{before.round}.csv"
    assert (week.runs / "after" / name).read_bytes() == (week.runs / "before" / name).read_bytes()


def _edit_features_json(folder: Path) -> None:
    features = json.loads((folder / "features.json").read_text())
    (folder / "features.json").write_text(json.dumps(features[::-1]))


def _flip_a_byte_of_the_model(folder: Path) -> None:
    data = bytearray((folder / "model.txt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.txt").write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, file", [(_edit_features_json, "features.json"),
                                          (_flip_a_byte_of_the_model, "model.txt")],
                         ids=["features.json-changed", "model.txt-changed"])
def test_a_model_directory_that_does_not_match_its_digest_stops_inference(week, tamper, file):
    tamper(week.registry.versions_dir / "v1")
    result = week.run("tampered")
    assert (result.status, result.exit_code) == ("error", 1)
    assert f"{file} does not match its SHA-256" in result.message
    week.assert_nothing_sent()
    assert not [r for r in week.sandbox.requests if r["kind"] == "file"]


# --- code from the model directory ---------------------------------------------------------

class _Payload:
    """Unpickling this writes a marker file: proof that code from the directory ran."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the model directory ran"))


def _relist(folder: Path) -> None:
    """Rewrite the manifest so that it lists every file with its real digest."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
                         if p.name != MANIFEST}
    manifest["digest"] = directory_digest(manifest["files"])
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_model_loading_never_unpickles_or_runs_code_from_the_model_directory(week, trained,
                                                                            tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))

    extra = shutil.copytree(trained[1], tmp_path / "extra")
    (extra / "model.pkl").write_bytes(payload)
    with pytest.raises(ModelIntegrityError, match="model.pkl is not listed"):
        load_model(extra)

    listed = shutil.copytree(extra, tmp_path / "listed")
    _relist(listed)
    model = load_model(listed)  # a listed extra file is never read
    assert model.booster is not None and model.features == week.features

    swapped = shutil.copytree(trained[1], tmp_path / "swapped")
    (swapped / "model.txt").write_bytes(payload)
    _relist(swapped)
    with pytest.raises(ModelIntegrityError, match="not a LightGBM text model"):
        load_model(swapped)

    shutil.copy(extra / "model.pkl", week.registry.versions_dir / "v1" / "model.pkl")
    result = week.run("pickled")
    assert (result.status, result.exit_code) == ("error", 1)
    assert "model.pkl is not listed" in result.message
    week.assert_nothing_sent()
    assert not marker.exists()


def test_the_library_has_no_unpickling_or_eval_on_its_loading_path():
    """The modules that download, load, verify and predict import no deserializer that can run
    code and call no `eval`, `exec` or dynamic import."""
    unsafe_modules = {"pickle", "joblib", "dill", "cloudpickle", "marshal", "shelve", "torch"}
    unsafe_builtins = {"eval", "exec", "compile", "__import__"}
    for name in ("model", "registry", "inference", "numerai", "data", "gates"):
        tree = ast.parse((ROOT / "numerai_nb" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported = {(node.module or "").split(".")[0]}
            else:
                imported = set()
            assert not imported & unsafe_modules, (name, imported)
            if isinstance(node, ast.Call):
                builtin = isinstance(node.func, ast.Name) and node.func.id in unsafe_builtins
                dynamic = getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "import_module"
                assert not builtin and not dynamic, (name, ast.unparse(node.func))


# --- the matrix itself -----------------------------------------------------------------------

def _tests_in(path: Path) -> set[str]:
    """`test_x` and `Class::test_x` names defined in a test file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body
                      if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
    return names


def matrix_references() -> list[str]:
    """Every `tests/...py::name` the fault matrix's table names."""
    notebook = json.loads(MATRIX.read_text())
    text = "\n".join("".join(c["source"]) for c in notebook["cells"]
                     if c["cell_type"] == "markdown")
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return re.findall(r"`(tests/test_\w+\.py::[\w:]+)`", "\n".join(rows))


def test_the_fault_matrix_and_the_tests_cannot_drift_apart():
    references = matrix_references()
    assert len(references) >= 20
    for reference in references:
        file, name = reference.split("::", 1)
        assert (ROOT / file).is_file(), reference
        assert name in _tests_in(ROOT / file), f"{reference} is named in the matrix but missing"
    own = _tests_in(Path(__file__)) - {"test_the_fault_matrix_and_the_tests_cannot_drift_apart"}
    named = {r.split("::", 1)[1] for r in references if r.startswith("tests/test_faults.py")}
    assert own - named == set(), "fault tests missing from the matrix"
    secrets = _tests_in(ROOT / "tests" / "test_secrets.py")
    assert secrets - {r.split("::", 1)[1] for r in references
                      if r.startswith("tests/test_secrets.py")} == set()

