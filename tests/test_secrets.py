"""No secret leaves the environment: `numerai-nb train` and `numerai-nb infer` run for real
(papermill, a kernel, LightGBM, numerapi over loopback to the sandbox, W&B offline) with
recognisable fake keys, then every file written and everything printed is searched for them,
raw and encoded.

The Numerai key pair is the sandbox's own (the sandbox accepts only it), so the authenticated
calls really carry it. `WANDB_API_KEY` is set for the training run with `WANDB_MODE=offline`:
the key then selects the W&B registry, which logs the model artifact offline, and the run's
metrics, plots and report go to offline W&B files that are searched too. Inference runs without
the W&B key, because resolving `prod` from the W&B registry needs the W&B server; the model the
training run wrote is logged to the local registry in between.
"""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import nbformat
import pytest

from numerai_nb.registry import LocalRegistry
from numerai_nb.sandbox import Sandbox, sandbox_env

PUBLIC_ID = "PUBLICFAKE-7c1e"
SECRET_KEY = "SECRETFAKE-93ab"
WANDB_KEY = "WANDBFAKE-4d2f" + "0123456789abcdef0123456789"  # 40 characters, like a real key
SECRETS = {"NUMERAI_PUBLIC_ID": PUBLIC_ID, "NUMERAI_SECRET_KEY": SECRET_KEY,
           "WANDB_API_KEY": WANDB_KEY}
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def encoded_forms(value: str) -> set[bytes]:
    """`value` raw, URL-encoded, hex, and as it appears inside any base64 text (each of the
    three alignments, standard and URL-safe alphabets)."""
    raw = value.encode()
    forms = {raw, quote(value, safe="").encode(), raw.hex().encode()}
    for offset in range(3):
        text = base64.b64encode(bytes(offset) + raw)
        inner = text[-(-offset * 4 // 3):(offset + len(raw)) * 4 // 3]
        forms |= {inner, inner.replace(b"+", b"-").replace(b"/", b"_")}
    return forms


FORBIDDEN = {form: name for name, value in {**SECRETS, "Authorization token":
                                             f"{PUBLIC_ID}${SECRET_KEY}"}.items()
             for form in encoded_forms(value)}


def leaks(data: bytes) -> list[str]:
    return sorted({name for form, name in FORBIDDEN.items() if form in data})


def numerai_nb(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "numerai-nb"), *map(str, args)], env=env, cwd=env["HOME"],
                          capture_output=True, timeout=600)


def test_the_search_finds_each_form_it_looks_for():
    token = f"Token {PUBLIC_ID}${SECRET_KEY}".encode()
    for shift in (b"", b"a", b"ab"):
        assert "Authorization token" in leaks(base64.b64encode(shift + token))
        assert "WANDB_API_KEY" in leaks(base64.urlsafe_b64encode(shift + WANDB_KEY.encode()))
    assert leaks(f"key={quote(SECRET_KEY + '$x', safe='')}".encode()) == ["NUMERAI_SECRET_KEY"]
    assert leaks(b"sandbox-secret, PUBLICFAKE-7c1, ***") == []


@pytest.fixture(scope="module")
def week(tmp_path_factory):
    """A training run (W&B key set, offline) and an inference run against a sandbox that
    accepts only the fake key pair; every file lives under one folder."""
    root = tmp_path_factory.mktemp("secrets")
    home, user_home = root / "nb-home", root / "user-home"
    user_home.mkdir()
    with Sandbox(home / "sandbox", public_id=PUBLIC_ID, secret_key=SECRET_KEY) as sandbox:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("WANDB_", "NUMERAI_", "XDG_", "JUPYTER_", "IPYTHON"))}
        env.update(sandbox_env(sandbox), HOME=str(user_home), NUMERAI_NB_HOME=str(home),
                   NUMERAI_DATA_DIR=str(root / "data"), LGBM_DEVICE="cpu", MPLBACKEND="Agg",
                   WANDB_MODE="offline", NUMERAI_NB_GATE_MIN_ROWS="100")
        assert (env["NUMERAI_PUBLIC_ID"], env["NUMERAI_SECRET_KEY"]) == (PUBLIC_ID, SECRET_KEY)
        train = numerai_nb("train", "-p", "feature_set", "small", "-p", "n_estimators", "30",
                           "-p", "every_nth_era", "1", "--out", home / "runs" / "train",
                           env={**env, "WANDB_API_KEY": WANDB_KEY})
        assert train.returncode == 0, (train.stdout + train.stderr).decode()[-3000:]
        model_dir = home / "runs" / "train" / "model"
        LocalRegistry(home / "registry").log_model(model_dir, aliases=("latest", "prod"))
        infer = numerai_nb("infer", "--out", home / "runs" / "infer", env=env)
        assert infer.returncode == 0, (infer.stdout + infer.stderr).decode()[-3000:]
        submissions = sandbox.submissions()
    return {"root": root, "home": home, "train": train, "infer": infer,
            "submissions": submissions}


def test_no_secret_in_any_file_written_or_anything_printed(week):
    assert len(week["submissions"]) == 1  # the key pair was used: the submission arrived
    files = [p for p in week["root"].rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"train.ipynb", "train.html", "inference.ipynb", "inference.html", "result.json",
            "summary.md", "manifest.json", "registry.json", "index.jsonl"} <= names
    assert [p for p in files if p.suffix == ".wandb"], "the W&B offline files were not written"
    assert any(p.suffix == ".csv" and "submissions" in p.parts for p in files)
    found = {str(p.relative_to(week["root"])): leaks(p.read_bytes()) for p in files}
    assert {path: names for path, names in found.items() if names} == {}
    for run in ("train", "infer"):
        output = week[run].stdout + week[run].stderr
        assert leaks(output) == [], run
        # Nothing had to be scrubbed after the fact: the values were never written at all.
        assert b"removed a secret value" not in output, run


def test_the_training_run_had_the_wandb_key_and_logged_offline(week):
    result = json.loads((week["home"] / "runs" / "train" / "result.json").read_text())
    assert result["model_version"] is None  # the W&B registry, offline: versioned on sync
    assert result["wandb_run"]
    runs = [p for p in (week["home"] / "wandb").rglob("offline-run-*") if p.is_dir()]
    assert len(runs) >= 2  # the training run and the reports attached to W&B


@pytest.mark.parametrize("run, notebook", [("train", "train.ipynb"),
                                           ("infer", "inference.ipynb")])
def test_papermill_parameters_never_carry_secrets(week, run, notebook):
    executed = nbformat.read(week["home"] / "runs" / run / notebook, as_version=4)
    [injected] = [c for c in executed.cells
                  if "injected-parameters" in c.metadata.get("tags", [])]
    parameters = executed.metadata["papermill"]["parameters"]
    assert "run_dir" in parameters
    text = (injected.source + repr(parameters)).encode()
    assert leaks(text) == []
    for name in SECRETS:
        assert name.lower() not in injected.source.lower()
    assert not {k for k in parameters if any(w in k.lower() for w in
                                             ("secret", "key", "token", "public_id"))}


def test_a_secret_value_given_as_a_parameter_is_refused_before_anything_runs(week, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NUMERAI_"))}
    env.update(HOME=str(tmp_path), NUMERAI_NB_HOME=str(tmp_path / "home"),
               NUMERAI_SECRET_KEY=SECRET_KEY, WANDB_MODE="offline")
    done = numerai_nb("infer", "-p", "model_alias", SECRET_KEY, "--out", tmp_path / "run",
                      "--no-wandb", env=env)
    assert done.returncode == 1
    assert b"looks like a secret" in done.stderr and leaks(done.stdout + done.stderr) == []
    assert not (tmp_path / "run" / "inference.ipynb").exists()
