"""The pipeline notebooks run by `numerai-nb train` and `numerai-nb infer` against the sandbox
tournament: real papermill, a real kernel, real LightGBM, the real numerapi client over
loopback, the local registry, and W&B offline (no server)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from numerai_nb.cli import bootstrap_repo
from numerai_nb.sandbox import Sandbox, SandboxSpec, sandbox_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PUBLIC_ID = "FAKEPUBLICID4TESTS7Q2"  # recognisable values: none may reach a run folder
SECRET_KEY = "FAKESECRETKEY4TESTS9X5"
SMALL = ["-p", "feature_set", "small", "-p", "n_estimators", "30", "-p", "every_nth_era", "1"]


def numerai_nb(*args, env, cwd=ROOT, exe=BIN / "numerai-nb"):
    return subprocess.run([str(exe), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def assert_no_secret(*folders):
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert PUBLIC_ID.encode() not in data and SECRET_KEY.encode() not in data, path


def run_files(folder):
    return {p.name for p in Path(folder).iterdir()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sandbox tournament with fake keys, a home folder, and the environment of a user."""
    home = tmp_path_factory.mktemp("home")
    spec = SandboxSpec(train_eras=24, validation_eras=10)
    with Sandbox(home / "sandbox", spec, public_id=PUBLIC_ID, secret_key=SECRET_KEY) as sandbox:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NUMERAI_"))}
        env.update(sandbox_env(sandbox), NUMERAI_NB_HOME=str(home), LGBM_DEVICE="cpu",
                   WANDB_MODE="offline", MPLBACKEND="Agg", NUMERAI_NB_GATE_MIN_ROWS="100")
        yield {"home": home, "sandbox": sandbox, "env": env}


@pytest.fixture(scope="module")
def trained(world):
    """One training run through the CLI, promoted to `prod`, with its report attached to W&B."""
    out = world["home"] / "train-run"
    done = numerai_nb("train", *SMALL, "-p", "promote", "True", "--out", out, env=world["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


def test_train_report_folder_and_injected_parameters(world, trained):
    out, done = trained
    assert {"train.ipynb", "train.html", "result.json", "summary.md"} <= run_files(out)
    assert f"run folder: {out}" in done.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "trained" and result["exit_code"] == 0
    # n_estimators=30 instead of the notebook's 2000 shows in the model the run logged
    model_dir = Path(result["model_dir"])
    assert json.loads((model_dir / "params.json").read_text())["n_estimators"] == 30
    assert (model_dir / "model.txt").read_text().count("\nTree=") == 30
    assert result["promotion"]["promoted"] is True
    notebook = nbformat.read(out / "train.ipynb", as_version=4)
    injected = next(c for c in notebook.cells
                    if "injected-parameters" in c.metadata.get("tags", []))
    assert "n_estimators = 30" in injected.source and "feature_set = \"small\"" in injected.source
    assert "30 trees" in (out / "train.html").read_text()
    assert_no_secret(out)


def test_train_report_is_attached_to_an_offline_wandb_run(world, trained):
    saved = {p.name for p in (world["home"] / "wandb").rglob("files/*")}
    assert {"train.ipynb", "train.html"} <= saved, saved
    assert_no_secret(world["home"] / "wandb")


def test_infer_submits_with_a_report(world, trained):
    out = world["home"] / "infer"
    done = numerai_nb("infer", "--out", out, "--no-wandb", env=world["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert {"inference.ipynb", "inference.html", "result.json", "summary.md"} <= run_files(out)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "submitted" and result["exit_code"] == 0
    assert result["model_version"] == "v1"
    [submission] = world["sandbox"].submissions()
    assert submission.round == result["submission"]["round"] == result["round"]
    html = (out / "inference.html").read_text()
    assert "schema.rows" in html and "Submitted" in html
    assert_no_secret(out)


def test_a_failed_gate_exits_2_with_its_summary(world, trained):
    out = world["home"] / "infer-gate"
    done = numerai_nb("infer", "--dry-run", "-p", "min_rows", "100000", "--out", out,
                      "--no-wandb", env=world["env"])
    assert done.returncode == 2, done.stdout + done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "gate_failed" and result["failed_gates"]
    assert "FAIL" in (out / "summary.md").read_text()
    assert {"inference.ipynb", "inference.html"} <= run_files(out)
    assert_no_secret(out)


def test_a_failed_run_keeps_its_notebook_and_names_the_cell(world):
    out = world["home"] / "train-bad"
    done = numerai_nb("train", "-p", "feature_set", "nope", "--out", out, "--no-wandb",
                      env=world["env"])
    assert done.returncode == 1
    assert re.search(r"train failed: cell In \[\d+\] \(`.+`\) raised \w+Error: feature set "
                     r"'nope'", done.stderr), done.stderr
    assert {"train.ipynb", "train.html"} <= run_files(out)
    notebook = nbformat.read(out / "train.ipynb", as_version=4)
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and "nope" in errors[0].evalue
    assert errors[0].ename in (out / "train.html").read_text()
    assert_no_secret(out)


def test_secrets_are_refused_as_parameters(world):
    done = numerai_nb("infer", "-p", "numerai_secret_key", "x", "--no-wandb", env=world["env"])
    assert done.returncode == 1 and "looks like a secret" in done.stderr


@pytest.mark.parametrize("name", ["train", "inference"])
def test_pipeline_notebooks_declare_their_parameters(name):
    path = ROOT / "nbs" / "pipelines" / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = papermill.inspect_notebook(str(path))
    assert "run_dir" in params and all(p["help"] for p in params.values())
    assert notebook.cells[0].cell_type == "raw" and "skip_exec: true" in notebook.cells[0].source
    if name == "train":
        assert {"feature_set", "n_estimators", "learning_rate", "every_nth_era", "promote",
                "force"} <= set(params)
    else:
        assert {"dry_run", "force", "resubmit", "min_rows", "max_drifted_share"} <= set(params)


def _snapshot_repo(folder: Path) -> str:
    """A git repository holding this working tree's files (tracked and new), committed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(source.read_bytes())
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "--quiet"], ["add", "-A"], ["commit", "--quiet", "-m", "snapshot"]):
        subprocess.run([*git, *args], cwd=folder, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_colab_runner_steps_clone_install_and_train(world, tmp_path):
    """The Colab runner's steps against a local clone: clone at a pinned commit, `pip install
    -e` it (into a throwaway venv that borrows this one's dependencies), run `numerai-nb train`
    from the clone's own console script."""
    origin = tmp_path / "origin"
    origin.mkdir()
    commit = _snapshot_repo(origin)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "_borrowed_dependencies.pth").write_text(f"{deps}\n")
    clone = bootstrap_repo(str(origin), commit, tmp_path / "numerai-nb",
                           pip_args=["--no-deps", "--no-build-isolation"],
                           python=venv / "bin" / "python")
    out = tmp_path / "colab-run"
    # nbconvert's templates are data files of the venv the packages are borrowed from; only
    # they are borrowed, so the kernel is the throwaway venv's own python
    data = tmp_path / "jupyter"
    (data / "nbconvert").mkdir(parents=True)
    (data / "nbconvert" / "templates").symlink_to(
        Path(sys.prefix) / "share" / "jupyter" / "nbconvert" / "templates")
    env = {**world["env"], "JUPYTER_PATH": str(data)}
    done = numerai_nb("train", *SMALL, "--out", out, "--no-wandb", env=env, cwd=tmp_path,
                      exe=venv / "bin" / "numerai-nb")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "result.json").read_text())
    manifest = json.loads((Path(result["model_dir"]) / "manifest.json").read_text())
    assert manifest["git_commit"].startswith(commit[:12])  # the clone's code trained it
    assert str(clone / "nbs" / "pipelines") in (out / "train.ipynb").read_text()


def test_train_with_dask_workers_trains_data_parallel_and_registers_nothing(world):
    """`dask_workers` hands training to lightgbm.dask on a local cluster; `register=False`
    (as a grid's members run) leaves the registry as it was."""
    out = world["home"] / "dask-run"
    before = sorted(p.name for p in (world["home"] / "registry").glob("versions/v*"))
    done = numerai_nb("train", *SMALL, "-p", "n_estimators", "12", "-p", "dask_workers", "2",
                      "-p", "register", "False", "--out", out, env=world["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["model_version"] is None and result["trees"] == 12
    assert result["metrics"]["corr_mean"] > 0
    assert re.search(r"trained 12 trees on 2 workers", (out / "train.ipynb").read_text())
    assert sorted(p.name for p in (world["home"] / "registry").glob("versions/v*")) == before
