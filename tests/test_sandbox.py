"""The sandbox tournament: v5.2-shaped files with a learnable signal, and the loopback server."""
import json
import threading
import time

import lightgbm as lgb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
import requests
from numerai_tools.scoring import numerai_corr

from numerai_nb.config import ConfigError, sha256_file
from numerai_nb.sandbox import (
    Sandbox,
    SandboxSpec,
    feature_layout,
    make_tournament,
    run_sandbox,
    sandbox_env,
    write_parquet_by_eras,
)

TINY = SandboxSpec(rows_per_era=30, train_eras=10, validation_eras=6, n_all=24, n_medium=12,
                   n_small=6, n_signal=3, live_rows=25)
FILES = ["features.json", "live.parquet", "live_example_preds.parquet", "meta_model.parquet",
         "train.parquet", "validation.parquet", "validation_example_preds.parquet"]


@pytest.fixture(scope="module")
def tournament(tmp_path_factory):
    return make_tournament(tmp_path_factory.mktemp("tournament"), TINY, round_number=1000)


def test_make_tournament_writes_every_v52_file_with_feature_sets_and_targets(tournament):
    assert sorted(p.name for p in tournament.iterdir()) == FILES
    metadata = json.loads((tournament / "features.json").read_text())
    sets = metadata["feature_sets"]
    assert (len(sets["small"]), len(sets["medium"]), len(sets["all"])) == (6, 12, 24)
    assert set(sets["small"]) < set(sets["medium"]) < set(sets["all"])
    assert {"intelligence", "wisdom", "charisma"} <= set(sets)
    assert all(name.startswith("feature_") for name in sets["all"])
    assert metadata["targets"][0] == "target" and "target_ender_20" in metadata["targets"]


def test_id_is_the_pandas_index_and_a_polars_column(tournament):
    for name in ("train.parquet", "validation.parquet", "live.parquet",
                 "validation_example_preds.parquet", "live_example_preds.parquet",
                 "meta_model.parquet"):
        frame = pd.read_parquet(tournament / name)
        assert frame.index.name == "id", name
        assert "id" in pl.read_parquet(tournament / name).columns, name
    ids = pl.read_parquet(tournament / "train.parquet")["id"]
    assert ids.str.contains(r"^n[0-9a-f]{15}$").all() and ids.n_unique() == len(ids)


def test_train_has_int8_features_0_to_4_with_gaps_an_all_twos_era_and_five_bin_targets(
        tournament):
    features = feature_layout(TINY)["names"]
    schema = pq.read_schema(tournament / "train.parquet")
    assert {str(schema.field(f).type) for f in features} == {"int8"}
    train = pl.read_parquet(tournament / "train.parquet")
    assert train["era"].unique().sort().to_list() == [f"{e:04d}" for e in range(1, 11)]
    assert train["data_type"].unique().to_list() == ["train"]
    values = train.select(features).unpivot()["value"]
    assert set(values.drop_nulls().unique().to_list()) == {0, 1, 2, 3, 4}
    assert values.null_count() > 0
    twos = [era for era, group in train.group_by("era")
            if (group.select(features).to_numpy() == 2).all()]
    assert twos == [("0006",)]
    assert train["target"].null_count() == 0
    assert sorted(train["target"].unique().to_list()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert train["target"].to_list() == train["target_ender_20"].to_list()
    assert train["target_jasper_20"].n_unique() == 7
    assert train["target_cyrus_20"].null_count() > 0


def test_validation_follows_train_and_its_last_eras_have_no_targets(tournament):
    validation = pl.read_parquet(tournament / "validation.parquet")
    eras = validation["era"].unique().sort().to_list()
    assert eras == [f"{e:04d}" for e in range(11, 17)]
    assert validation["data_type"].unique().to_list() == ["validation"]
    unscored = validation.filter(pl.col("target").is_null())["era"].unique().sort().to_list()
    assert unscored == ["0015", "0016"]
    meta = pl.read_parquet(tournament / "meta_model.parquet")
    assert meta.columns == ["id", "era", "numerai_meta_model"]
    assert set(meta["id"]) <= set(validation["id"])
    assert 0 < meta["era"].n_unique() < len(eras)
    example = pl.read_parquet(tournament / "validation_example_preds.parquet")
    assert example.columns == ["id", "prediction"] and example.height == validation.height
    assert example["prediction"].is_between(0, 1).all()


def test_live_is_one_round_of_unlabelled_stocks(tournament):
    live = pl.read_parquet(tournament / "live.parquet")
    assert live.height == 25 and live["data_type"].unique().to_list() == ["live"]
    assert live["target"].null_count() == 25
    train_ids = set(pl.read_parquet(tournament / "train.parquet")["id"])
    assert not set(live["id"]) & train_ids
    preds = pl.read_parquet(tournament / "live_example_preds.parquet")
    assert sorted(preds["id"]) == sorted(live["id"])


def test_same_spec_gives_identical_files_and_another_seed_other_data(tournament, tmp_path):
    again = make_tournament(tmp_path / "again", TINY, round_number=1000)
    for name in FILES:
        assert sha256_file(again / name) == sha256_file(tournament / name), name
    other = make_tournament(tmp_path / "other", SandboxSpec(**{**TINY.as_dict(), "seed": 1}))
    assert sha256_file(other / "train.parquet") != sha256_file(tournament / "train.parquet")


def test_impossible_sizes_are_refused():
    with pytest.raises(ConfigError, match="n_small <= n_medium"):
        SandboxSpec(n_small=50, n_medium=40)
    with pytest.raises(ConfigError, match="unscored_eras"):
        SandboxSpec(validation_eras=2, unscored_eras=2)


def test_fifty_trees_learn_the_planted_signal_on_the_default_tournament(tmp_path):
    folder = make_tournament(tmp_path, SandboxSpec())
    features = json.loads((folder / "features.json").read_text())["feature_sets"]["medium"]
    train = pl.read_parquet(folder / "train.parquet")
    booster = lgb.train({"learning_rate": 0.05, "max_depth": 5, "num_leaves": 15,
                         "colsample_bytree": 0.5, "verbose": -1, "seed": 1},
                        lgb.Dataset(train.select(features).to_numpy(),
                                    train["target"].to_numpy()), num_boost_round=50)
    validation = pl.read_parquet(folder / "validation.parquet").drop_nulls("target")
    frame = validation.select("era", "target").to_pandas()
    frame["prediction"] = booster.predict(validation.select(features).to_numpy())
    per_era = frame.groupby("era").apply(
        lambda era: numerai_corr(era[["prediction"]], era["target"])["prediction"])
    assert per_era.mean() > 0.02, per_era


def test_parquet_is_written_by_eras_in_row_groups(tmp_path):
    import pyarrow as pa
    tables = (pa.table({"era": [f"{e:04d}"] * 10, "x": np.arange(10)}) for e in range(7))
    rows = write_parquet_by_eras(tmp_path / "x.parquet", tables, values_per_group=40)
    meta = pq.ParquetFile(tmp_path / "x.parquet").metadata
    assert (rows, meta.num_rows, meta.num_row_groups) == (70, 70, 4)


def _graphql(sandbox, query, variables=None, token=None):
    headers = {"Authorization": token} if token else {}
    return requests.post(sandbox.url, json={"query": query, "variables": variables},
                         headers=headers, timeout=5)


DATASET = "query($filename: String! $round: Int) { dataset(filename: $filename round: $round) }"


def test_files_are_served_with_content_length_and_ranges(sandbox):
    url = _graphql(sandbox, DATASET, {"filename": "v5.2/train.parquet"}).json()["data"]["dataset"]
    whole = requests.get(url, timeout=5)
    path = sandbox.tournament.data_dir / "train.parquet"
    assert whole.content == path.read_bytes()
    assert int(whole.headers["Content-Length"]) == path.stat().st_size
    tail = requests.get(url, headers={"Range": "bytes=1000-"}, timeout=5)
    assert tail.status_code == 206 and tail.content == path.read_bytes()[1000:]
    assert tail.headers["Content-Range"].endswith(f"/{path.stat().st_size}")
    beyond = requests.get(url, headers={"Range": f"bytes={path.stat().st_size}-"}, timeout=5)
    assert beyond.status_code == 416
    missing = _graphql(sandbox, DATASET, {"filename": "v5.2/secrets.parquet"}).json()
    assert "not found" in missing["errors"][0]["message"]


def test_a_truncated_download_announces_the_full_length_and_sends_half(sandbox):
    url = _graphql(sandbox, DATASET, {"filename": "v5.2/train.parquet"}).json()["data"]["dataset"]
    sandbox.faults.truncate_download = 1
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=5).content  # noqa: B018
    assert requests.get(url, timeout=5).content == \
        (sandbox.tournament.data_dir / "train.parquet").read_bytes()


def test_each_new_round_serves_new_live_data_and_a_restart_keeps_the_round(tmp_path):
    with Sandbox(tmp_path, TINY) as sandbox:
        first = _graphql(sandbox, DATASET, {"filename": "v5.2/live.parquet"}).json()
        first_bytes = requests.get(first["data"]["dataset"], timeout=5).content
        assert sandbox.new_round() == 1001
        second = _graphql(sandbox, DATASET, {"filename": "v5.2/live.parquet"}).json()
        assert "/1001/" in second["data"]["dataset"]
        assert requests.get(second["data"]["dataset"], timeout=5).content != first_bytes
        old = _graphql(sandbox, DATASET, {"filename": "v5.2/live.parquet", "round": 1000})
        assert requests.get(old.json()["data"]["dataset"], timeout=5).content == first_bytes
    with Sandbox(tmp_path, TINY) as restarted:
        assert restarted.round_number == 1001


def test_round_state_faults_and_authentication(sandbox):
    rounds = "query($t: Int!) { rounds(tournament: $t number: 0) { number openTime " \
             "closeStakingTime } }"
    current = _graphql(sandbox, rounds, {"t": 8}).json()["data"]["rounds"][0]
    assert current["number"] == 1000 and current["openTime"].endswith("Z")
    sandbox.faults.naive_times = True
    assert not _graphql(sandbox, rounds, {"t": 8}).json()["data"]["rounds"][0][
        "openTime"].endswith("Z")
    sandbox.faults.reset()
    sandbox.faults.server_errors, sandbox.faults.rate_limited = 1, 1
    assert _graphql(sandbox, rounds, {"t": 8}).status_code == 503
    limited = _graphql(sandbox, rounds, {"t": 8})
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "1")
    assert _graphql(sandbox, rounds, {"t": 8}).status_code == 200
    account = "query { account { models { id name tournament } } }"
    assert "invalid" in _graphql(sandbox, account, token="Token a$b").json()["errors"][0][
        "message"]
    good = _graphql(sandbox, account, token="Token sandbox-public$sandbox-secret").json()
    assert [m["name"] for m in good["data"]["account"]["models"] if m["tournament"] == 8] == \
        ["sandbox_model"]


def test_stopping_does_not_wait_for_a_hanging_reply_and_frees_the_port(tmp_path):
    sandbox = Sandbox(tmp_path, TINY).start()
    sandbox.faults.hang_seconds = 30
    url = sandbox.url
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url, json={"query": "{ listDatasets }"}, timeout=0.3)
    stopper = threading.Thread(target=sandbox.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(url, json={"query": "{ listDatasets }"}, timeout=2)


def test_run_sandbox_serves_in_the_foreground_until_stopped(tmp_path, caplog):
    stop = threading.Event()
    caplog.set_level("INFO", logger="numerai_nb")
    server = threading.Thread(target=run_sandbox, args=(tmp_path, TINY, 0),
                              kwargs={"stop": stop})
    server.start()
    try:
        deadline = time.monotonic() + 20
        while "export NUMERAI_API_URL=" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        url = caplog.text.split("export NUMERAI_API_URL=")[1].split()[0]
        reply = requests.post(url, json={"query": "{ listDatasets }"}, timeout=5)
        assert reply.json()["data"]["listDatasets"][0] == "v5.2/features.json"
    finally:
        stop.set()
        server.join(10)
    assert not server.is_alive()


def test_sandbox_env_points_at_the_running_sandbox(sandbox):
    env = sandbox_env(sandbox)
    assert env["NUMERAI_API_URL"] == sandbox.url
    assert (env["NUMERAI_PUBLIC_ID"], env["NUMERAI_SECRET_KEY"]) == ("sandbox-public",
                                                                    "sandbox-secret")
    assert env["NUMERAI_MODEL_NAME"] == "sandbox_model"
