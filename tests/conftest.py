"""Shared fixtures: a sandbox tournament on a free port, and the environment pointing at it."""
import shutil

import pytest

from numerai_nb.sandbox import Sandbox, SandboxSpec, SandboxTournament
from numerai_nb.sandbox import sandbox_env as sandbox_variables


@pytest.fixture
def tournament_spec() -> SandboxSpec:
    """The default sandbox tournament (4,000 train rows, 60 features): trains in a second.

    Every default sandbox serves exactly these files, so a model trained on
    `make_tournament(folder, SandboxSpec())` matches what the `sandbox` fixture serves.
    Override this fixture in a test module or class for other sizes."""
    return SandboxSpec()


@pytest.fixture(scope="session")
def tournament_files(tmp_path_factory):
    """Made once per spec and session: the sandbox data folder each `sandbox` starts from."""
    made = {}

    def files_for(spec: SandboxSpec):
        if spec not in made:
            root = tmp_path_factory.mktemp("tournament")
            SandboxTournament(root, spec).prepare()
            made[spec] = root / "data"
        return made[spec]
    return files_for


@pytest.fixture
def sandbox(tmp_path, tournament_spec, tournament_files):
    """A sandbox serving `tournament_spec` on a free loopback port, stopped after the test.

    Its files are a private copy under tmp_path: a test may change or damage them."""
    root = tmp_path / "sandbox"
    shutil.copytree(tournament_files(tournament_spec), root / "data")
    with Sandbox(root, tournament_spec) as running:
        yield running


@pytest.fixture
def sandbox_env(sandbox, tmp_path, monkeypatch) -> dict:
    """The environment pointing the pipeline at `sandbox`, with state and data under tmp_path."""
    env = {"NUMERAI_NB_HOME": str(tmp_path / "home"), "NUMERAI_DATA_DIR": str(tmp_path / "data"),
           **sandbox_variables(sandbox)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
