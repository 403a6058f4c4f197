"""The `numerai-nb` console script: the demo week on the sandbox, the registry commands, the
sandbox in the foreground, and the commands that hand over to other modules."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from numerai_nb import cli
from numerai_nb.config import Settings
from numerai_nb.model import load_model, save_model_dir
from numerai_nb.numerai import NumeraiClient
from numerai_nb.registry import LocalRegistry

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = ("train", "infer", "demo", "sandbox", "registry", "bench", "grid", "readme",
            "docs-check")


def user_env(home: Path) -> dict:
    """A user's environment with no Numerai or W&B variables, state under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NUMERAI_"))}
    return {**env, "NUMERAI_NB_HOME": str(home), "LGBM_DEVICE": "cpu", "MPLBACKEND": "Agg"}


def numerai_nb(*args, env):
    return subprocess.run([str(BIN / "numerai-nb"), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    done = subprocess.run([BIN / "numerai-nb", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    listed = re.findall(r"^    (\S+)\s", done.stdout, re.M)
    assert tuple(listed) == COMMANDS
    done = subprocess.run([BIN / "numerai-nb", "infer", "--help"], capture_output=True, text=True)
    for option in ("-p NAME VALUE", "-y YAML", "-f FILE", "--out DIR", "--dry-run", "--force"):
        assert option in done.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One `numerai-nb demo` run: sandbox, train, promote, infer, submit."""
    home = tmp_path_factory.mktemp("home")
    out = home / "demo"
    done = numerai_nb("demo", "-p", "n_estimators", "30", "--no-wandb", "--out", out,
                      env=user_env(home))
    assert done.returncode == 0, done.stdout + done.stderr
    return home, out, done.stdout


def test_demo_trains_promotes_infers_and_submits(demo):
    home, out, stdout = demo
    assert re.search(r"Validation metrics \(model v1\):\n  corr_mean\s+-?\d\.\d{4}", stdout)
    assert "Promotion:" in stdout and "Inference: submitted" in stdout
    assert re.search(r"^  pass  schema\.rows", stdout, re.M)
    assert re.search(r"Submission: round \d+, model sandbox_model, 200 rows, id \S+", stdout)
    for report in (out / "train" / "train.html", out / "inference" / "inference.html"):
        assert report.exists() and str(report) in stdout
    result = json.loads((out / "inference" / "result.json").read_text())
    received = list((home / "sandbox" / "submissions").rglob("*.csv"))
    assert result["status"] == "submitted" and len(received) == 1
    assert received[0].read_text().startswith("id,prediction\n")
    for path in out.rglob("*"):  # the sandbox's own key pair is a secret like any other
        assert not path.is_file() or b"sandbox-secret" not in path.read_bytes(), path


def log_worse_model(home: Path, model_dir: Path, folder: Path) -> None:
    """Log the demo's model again as v2, with a validation score no rule would promote."""
    model = load_model(model_dir)
    metrics = {**model.metrics, "corr_mean": -0.5}
    save_model_dir(folder, (model_dir / "model.txt").read_text(), model.features,
                   json.loads((model_dir / "params.json").read_text()), metrics,
                   model.reference, {k: model.manifest[k] for k in ("dataset_version",
                                                                    "feature_set", "target")})
    LocalRegistry(Settings.from_env(user_env(home)).registry_dir).log_model(folder)


def test_registry_list_promote_and_rollback(demo, tmp_path, monkeypatch, capsys):
    """The registry commands, called in-process (the console script is exercised above)."""
    home, out, _ = demo
    for key, value in user_env(home).items():
        monkeypatch.setenv(key, value)

    def run(*args):
        code = cli.main(["registry", *args])
        return code, capsys.readouterr()

    code, printed = run("rollback")
    assert code == 1 and "cannot roll back 'prod'" in printed.err
    log_worse_model(home, out / "train" / "model", tmp_path / "worse")
    code, printed = run("promote", "v2")
    assert code == 1 and "v2 not promoted" in printed.out, printed
    code, printed = run("promote", "v2", "--force")
    assert code == 0 and "v2 promoted to prod" in printed.out, printed
    code, printed = run("rollback")
    assert code == 0 and "prod is now v1" in printed.out
    code, printed = run("list")
    assert code == 0 and re.search(r"^\| v1 \| [^|]*prod", printed.out, re.M), printed.out
    assert re.search(r"^\| v2 \| latest \| -0.5000", printed.out, re.M), printed.out


def test_sandbox_serves_in_the_foreground_until_interrupted(tmp_path):
    server = subprocess.Popen([BIN / "numerai-nb", "sandbox", "--port", "0", "--root",
                               tmp_path / "sandbox"], env=user_env(tmp_path), cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stderr:
            if match := re.search(r"sandbox tournament at (http://127\.0\.0\.1:\d+/graphql)", line):
                url = match.group(1)
                break
        assert url, "the sandbox never said where it listens"
        settings = Settings.from_env(user_env(tmp_path), api_url=url)
        assert NumeraiClient(settings).current_round() >= 1
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0


def test_tool_commands_hand_their_arguments_over(monkeypatch):
    """`readme`, `docs-check`, `bench` and `grid` call their modules (replaced here by recorders,
    since each module tests its own work)."""
    from numerai_nb import bench, docs, grid
    calls = []
    monkeypatch.setattr(docs, "write_readme", lambda check: calls.append(("readme", check)) or 0)
    monkeypatch.setattr(docs, "check_docs", lambda: calls.append(("docs",)) or 1)
    monkeypatch.setattr(bench, "main", lambda argv: calls.append(("bench", argv)) or 0)
    monkeypatch.setattr(grid, "main", lambda argv: calls.append(("grid", argv)) or 3)
    assert cli.main(["readme", "--check"]) == 0
    assert cli.main(["docs-check"]) == 1
    assert cli.main(["bench", "--quick", "--trees", "5"]) == 0
    assert cli.main(["grid", "grid.yaml", "--workers", "2"]) == 3
    assert calls == [("readme", True), ("docs",), ("bench", ["--quick", "--trees", "5"]),
                     ("grid", ["grid.yaml", "--workers", "2"])]
    with pytest.raises(SystemExit):
        cli.main(["readme", "--bogus"])
