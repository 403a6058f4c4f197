"""The project's ground: nbdev settings keeping papermill's tag, the README, settings, secrets."""
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from numerai_nb.config import MissingSecretError, Settings, read_secret, setup_logging
from numerai_nb.docs import readme_markdown

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tagged_notebook():
    cell = {"cell_type": "code", "execution_count": 3, "id": "abc", "outputs": [],
            "metadata": {"tags": ["parameters"], "scrolled": True}, "source": ["n_estimators = 10"]}
    return {"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "language": "python",
            "display_name": "Python 3"}}, "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.parametrize("keep_tags", [True, False])
def test_nbdev_clean_keeps_the_parameters_tag_only_with_the_project_setting(tmp_path, keep_tags):
    settings = (ROOT / "settings.ini").read_text()
    if not keep_tags:
        settings = re.sub(r"^allowed_cell_metadata_keys.*$", "", settings, flags=re.M)
    (tmp_path / "settings.ini").write_text(settings)
    (tmp_path / "nbs").mkdir()
    notebook = tmp_path / "nbs" / "train.ipynb"
    notebook.write_text(json.dumps(_tagged_notebook()))
    subprocess.run([BIN / "nbdev_clean", "--fname", str(notebook)], cwd=tmp_path, check=True)
    metadata = json.loads(notebook.read_text())["cells"][0]["metadata"]
    assert "scrolled" not in metadata
    assert (metadata.get("tags") == ["parameters"]) is keep_tags


def test_readme_is_generated_from_index_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert readme == readme_markdown(ROOT / "nbs" / "index.ipynb")
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands[:2] == ["make demo", "make test"]


def test_ci_runs_make_test_and_make_test_runs_every_check():
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
    test_line = re.search(r"^test:(.*)##", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    steps = ["check-export", "check-clean", "lint", "readme-check", "docs-check", "nbtest",
             "pytest"]
    assert [s for s in test_line if s in steps] == steps


def test_secrets_are_not_settings_and_never_reach_repr_or_logs(monkeypatch, capsys):
    secret = "fake-secret-7f3a9c"
    for name in ("NUMERAI_PUBLIC_ID", "NUMERAI_SECRET_KEY", "WANDB_API_KEY"):
        monkeypatch.setenv(name, f"{secret}-{name}")
    settings = Settings.from_env()
    assert secret not in repr(settings) and secret not in json.dumps(settings.as_dict())
    setup_logging(logging.DEBUG)
    logging.getLogger("numerai_nb.test").warning("header Token %s", read_secret("WANDB_API_KEY"))
    assert secret not in capsys.readouterr().err


def test_a_missing_secret_stops_naming_the_variable_and_where_to_set_it(monkeypatch):
    monkeypatch.delenv("NUMERAI_SECRET_KEY", raising=False)
    with pytest.raises(MissingSecretError, match="NUMERAI_SECRET_KEY is not set.*Colab Secrets"):
        read_secret("NUMERAI_SECRET_KEY")


def test_settings_come_from_the_environment_and_parameters_override_them(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMERAI_NB_HOME", str(tmp_path))
    monkeypatch.setenv("NUMERAI_FEATURE_SET", "small")
    monkeypatch.setenv("LGBM_DEVICE", "cpu")
    settings = Settings.from_env(feature_set="all")
    assert (settings.home, settings.feature_set, settings.lgbm_device) == (tmp_path, "all", "cpu")
    assert settings.data_dir == tmp_path / "data" and settings.dataset_version == "v5.2"


def test_the_console_script_lists_the_commands():
    assert shutil.which("numerai-nb", path=str(BIN))
    out = subprocess.run([BIN / "numerai-nb", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("train", "infer", "demo", "sandbox", "registry"):
        assert command in out
