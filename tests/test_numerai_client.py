"""NumeraiClient driving the real numerapi 3.1.1 client against the sandbox over loopback."""
import hashlib
from datetime import UTC

import numerapi
import numerapi.base_api
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from numerai_nb.config import (
    ConfigError,
    DataError,
    MissingSecretError,
    NumeraiApiError,
    Settings,
    SubmissionError,
    sha256_file,
)
from numerai_nb.numerai import NumeraiClient, RetryPolicy

FAST = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05)


def make_client(**settings_changes) -> NumeraiClient:
    settings = Settings.from_env().replace(**settings_changes)
    return NumeraiClient.from_settings(settings, require_auth=True, retry=FAST,
                                       show_progress=False)


@pytest.fixture
def client(sandbox_env) -> NumeraiClient:
    return make_client(http_timeout=5)


def write_predictions(live_path, csv_path, value=0.5):
    live = pd.read_parquet(live_path)
    pd.DataFrame({"prediction": value}, index=live.index).to_csv(csv_path)
    return csv_path


def graphql_requests(sandbox, fault=None):
    return [r for r in sandbox.requests if r["kind"] == "graphql" and r["fault"] == fault]


def test_unset_api_url_means_numerais_own_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMERAI_API_URL", raising=False)
    settings = Settings.from_env({"NUMERAI_NB_HOME": str(tmp_path)})
    assert NumeraiClient(settings).api_url == numerapi.base_api.API_TOURNAMENT_URL


def test_round_datasets_and_models_come_through_numerapi(client, sandbox):
    state = client.round_state()
    assert (state.number, state.is_open) == (1000, True)
    assert state.open_time.tzinfo is not None and state.open_time < state.close_time
    assert client.current_round() == 1000
    assert "v5.2/train.parquet" in client.list_datasets()
    assert client.models() == {"sandbox_model": sandbox.models["sandbox_model"]}
    assert numerapi.base_api.API_TOURNAMENT_URL == "https://api-tournament.numer.ai"


def test_naive_round_times_are_read_as_utc_where_numerapi_raises_typeerror(client, sandbox,
                                                                           monkeypatch):
    sandbox.faults.naive_times = True
    state = client.round_state()
    assert state.is_open and state.close_time.tzinfo == UTC
    monkeypatch.setattr(numerapi.base_api, "API_TOURNAMENT_URL", sandbox.url)
    with pytest.raises(TypeError):
        numerapi.NumerAPI().check_round_open()


def test_training_data_download_into_the_version_folder_and_are_reused(client, sandbox,
                                                                       sandbox_env):
    paths = client.download_training_data("medium")
    assert sorted(paths) == ["features", "meta_model", "train", "validation",
                             "validation_example_preds"]
    version_dir = client.settings.version_dir
    assert str(version_dir).startswith(sandbox_env["NUMERAI_DATA_DIR"])
    for path in paths.values():
        assert path.parent == version_dir.resolve()
        assert sha256_file(path) == sha256_file(sandbox.tournament.data_dir / path.name)
    assert not [p for p in version_dir.iterdir() if p.name.startswith(".")]
    downloads = len([r for r in sandbox.requests if r["kind"] == "file"])
    assert client.download_training_data("medium") == paths
    assert len([r for r in sandbox.requests if r["kind"] == "file"]) == downloads


def test_an_unknown_feature_set_stops_before_train_is_downloaded(client):
    with pytest.raises(ConfigError, match="feature set 'huge' is not in v5.2's features.json"):
        client.download_training_data("huge")
    assert not (client.settings.version_dir / "train.parquet").exists()


def test_a_damaged_local_file_is_downloaded_again(client, sandbox):
    path = client.download("train.parquet")
    path.write_bytes(path.read_bytes()[:500])
    assert sha256_file(client.download("train.parquet")) == \
        sha256_file(sandbox.tournament.data_dir / "train.parquet")


def test_each_round_has_its_own_live_file(client, sandbox):
    first, number = client.download_live()
    assert (first.name, number) == ("live_1000.parquet", 1000)
    sandbox.new_round()
    second, number = client.download_live()
    assert (second.name, number) == ("live_1001.parquet", 1001)
    assert sha256_file(second) == sha256_file(
        sandbox.tournament.dataset_path(1001, "v5.2/live.parquet"))
    assert sha256_file(second) != sha256_file(first) and first.exists()


def test_file_names_from_the_api_cannot_leave_the_data_folder(client):
    with pytest.raises(DataError, match="outside"):
        client.download("v5.2/../../escaped.parquet")


class TestTruncatedDownloads:
    @pytest.fixture
    def sandbox(self, sandbox):
        """The sandbox serving a train.parquet of 3.2 MB, so that half of it is more than
        numerapi's 1 MiB write chunk and a resume starts past the first byte."""
        noise = np.random.default_rng(0).random(400_000)
        pq.write_table(pa.table({"noise": noise}), sandbox.tournament.data_dir / "train.parquet",
                       compression="none")
        return sandbox

    def test_a_cut_short_download_resumes_where_it_stopped(self, client, sandbox):
        source = sandbox.tournament.data_dir / "train.parquet"
        assert source.stat().st_size > 2 * 2**20
        sandbox.faults.truncate_download = 1
        path = client.download("train.parquet")
        assert sha256_file(path) == sha256_file(source)
        files = [r for r in sandbox.requests if r["kind"] == "file"]
        assert files[0]["truncated"] and files[-1]["range_start"] >= 2**20

    def test_a_download_cut_short_every_time_is_an_error_and_never_kept(self, client, sandbox):
        sandbox.faults.truncate_download = 100
        with pytest.raises(NumeraiApiError, match="download_dataset failed: v5.2/train.parquet "
                                                  "was cut short") as error:
            client.download("train.parquet")
        assert "Run again" in str(error.value)
        assert not (client.settings.version_dir / "train.parquet").exists()
        sandbox.faults.reset()
        path = client.download("train.parquet")
        assert sha256_file(path) == sha256_file(sandbox.tournament.data_dir / "train.parquet")
        assert [p.name for p in client.settings.version_dir.iterdir()] == ["train.parquet"]


def test_a_file_served_damaged_is_never_kept_as_good(client, sandbox):
    source = sandbox.tournament.data_dir / "validation.parquet"
    source.write_bytes(source.read_bytes()[:-100])
    with pytest.raises(DataError, match="validation.parquet is not a readable parquet"):
        client.download("validation.parquet")
    assert list(client.settings.version_dir.iterdir()) == []


def test_a_submission_is_recorded_and_the_sandbox_holds_the_exact_csv(client, sandbox,
                                                                      tmp_path):
    live, number = client.download_live()
    csv_path = write_predictions(live, tmp_path / "predictions.csv")
    record = client.submit(csv_path)
    assert (record.round, record.model_name, record.rows) == (number, "sandbox_model", 200)
    assert record.model_id == sandbox.models["sandbox_model"]
    assert record.sha256 == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    [received] = sandbox.submissions()
    assert (received.submission_id, received.round, received.model_name) == \
        (record.submission_id, number, "sandbox_model")
    assert received.csv_bytes() == csv_path.read_bytes()
    assert received.path.startswith(str(sandbox.root / "submissions"))


def test_a_csv_without_the_submission_header_is_refused_before_upload(client, sandbox,
                                                                      tmp_path):
    csv_path = tmp_path / "predictions.csv"
    csv_path.write_text("id,pred\nn000000000000001,0.5\n")
    with pytest.raises(SubmissionError, match="header 'id,prediction'"):
        client.submit(csv_path)
    assert [r for r in sandbox.requests if r["kind"] == "upload"] == []


def test_a_burst_of_server_errors_is_retried_and_succeeds(client, sandbox):
    sandbox.faults.server_errors = 3
    assert client.current_round() == 1000
    assert len(graphql_requests(sandbox, "server_error")) == 3


def test_server_errors_beyond_the_retry_cap_are_a_clear_error(client, sandbox):
    sandbox.faults.server_errors = 10
    with pytest.raises(NumeraiApiError, match=r"list_datasets failed \(HTTP 503\): Service "
                                              "Unavailable after 4 attempts") as error:
        client.list_datasets()
    assert error.value.status == 503 and "try again later" in str(error.value)
    assert len(graphql_requests(sandbox, "server_error")) == 4


def test_rate_limiting_is_retried(client, sandbox):
    sandbox.faults.rate_limited = 2
    assert client.models() == {"sandbox_model": sandbox.models["sandbox_model"]}
    assert len(graphql_requests(sandbox, "rate_limited")) == 2


def test_other_4xx_replies_are_not_retried(sandbox_env, sandbox):
    client = make_client(api_url=sandbox.base_url + "/not-graphql")
    with pytest.raises(NumeraiApiError, match=r"list_datasets failed \(HTTP 404\)") as error:
        client.list_datasets()
    assert error.value.status == 404
    assert len(graphql_requests(sandbox, "not_found")) == 1


def test_a_hanging_reply_times_out_with_a_clear_error(sandbox_env, sandbox):
    sandbox.faults.hang_seconds = 10
    client = make_client(http_timeout=0.3)
    with pytest.raises(NumeraiApiError, match="get_current_round failed: no reply from .* "
                                              "within 0.3 s") as error:
        client.current_round()
    assert "NUMERAI_HTTP_TIMEOUT" in str(error.value)
    assert len(sandbox.requests) == 1


def test_a_refused_connection_is_a_clear_error(sandbox_env, sandbox):
    url = sandbox.url
    sandbox.stop()
    client = make_client(api_url=url)
    with pytest.raises(NumeraiApiError, match="round_state failed: cannot connect to .* "
                                              r"\(Connection refused\)") as error:
        client.round_state()
    assert "NUMERAI_API_URL" in str(error.value)


def test_a_refused_upload_is_a_submission_error_and_nothing_is_submitted(client, sandbox,
                                                                         tmp_path):
    live, _ = client.download_live()
    csv_path = write_predictions(live, tmp_path / "predictions.csv")
    sandbox.faults.refuse_upload = True
    with pytest.raises(SubmissionError, match=r"not accepted, so nothing was submitted.*"
                                              r"HTTP 403"):
        client.submit(csv_path)
    assert sandbox.submissions() == []
    assert [r["refused"] for r in sandbox.requests if r["kind"] == "upload"] == [True]


def test_plain_numerapi_reports_a_refused_upload_as_submitted(sandbox, tmp_path, monkeypatch):
    """The numerapi behaviour the client guards against, shown on the same refused upload."""
    live = sandbox.tournament.dataset_path(1000, "v5.2/live.parquet")
    csv_path = write_predictions(live, tmp_path / "predictions.csv")
    sandbox.faults.refuse_upload = True
    monkeypatch.setattr(numerapi.base_api, "API_TOURNAMENT_URL", sandbox.url)
    api = numerapi.NumerAPI(sandbox.public_id, sandbox.secret_key)
    submission_id = api.upload_predictions(str(csv_path), sandbox.models["sandbox_model"])
    [received] = sandbox.submissions()
    assert received.submission_id == submission_id and received.path is None


def test_a_closed_round_reads_closed_and_refuses_submissions(client, sandbox, tmp_path):
    live, _ = client.download_live()
    csv_path = write_predictions(live, tmp_path / "predictions.csv")
    sandbox.faults.round_closed = True
    assert client.round_state().is_open is False
    with pytest.raises(SubmissionError, match="round 1000 closed at .* nothing was submitted"):
        client.submit(csv_path)
    sandbox.faults.reset()
    sandbox.close_round()
    with pytest.raises(NumeraiApiError, match="Round 1000 is closed for submissions"):
        client.submit(csv_path, require_open=False)
    assert sandbox.submissions() == []
    assert [r for r in sandbox.requests if r["kind"] == "upload"] == []


def test_wrong_keys_are_a_clear_error_naming_the_variables(sandbox_env, monkeypatch, tmp_path):
    monkeypatch.setenv("NUMERAI_SECRET_KEY", "guessed-secret")
    client = make_client()
    with pytest.raises(NumeraiApiError, match="get_models failed: Your session is invalid or "
                                              "has expired. Check NUMERAI_PUBLIC_ID and "
                                              "NUMERAI_SECRET_KEY"):
        client.models()
    assert "guessed-secret" not in repr(client)


def test_revoked_keys_refuse_a_submission_and_nothing_is_sent(client, sandbox, tmp_path):
    live, _ = client.download_live()
    csv_path = write_predictions(live, tmp_path / "predictions.csv")
    sandbox.faults.bad_credentials = True
    with pytest.raises(NumeraiApiError, match="Check NUMERAI_PUBLIC_ID and NUMERAI_SECRET_KEY"):
        client.submit(csv_path)
    assert sandbox.submissions() == []
    assert [r for r in sandbox.requests if r["kind"] == "upload"] == []


def test_missing_keys_stop_at_once_naming_the_variable(sandbox_env, monkeypatch):
    monkeypatch.delenv("NUMERAI_SECRET_KEY")
    with pytest.raises(MissingSecretError, match="NUMERAI_SECRET_KEY is not set"):
        NumeraiClient.from_settings(Settings.from_env(), require_auth=True)


def test_an_unknown_model_name_lists_the_accounts_models(client, sandbox, tmp_path):
    live, _ = client.download_live()
    csv_path = write_predictions(live, tmp_path / "predictions.csv")
    with pytest.raises(ConfigError, match=r"'my_model' is not one of this account's models "
                                          r"\(sandbox_model\)"):
        client.submit(csv_path, "my_model")
    assert sandbox.submissions() == []
