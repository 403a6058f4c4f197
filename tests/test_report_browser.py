"""A training report's HTML, opened in a real headless Chromium: the metrics table and the plots
are on the page the browser built, not only in the file."""
import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from numerai_nb.config import environment
from numerai_nb.reports import run_pipeline
from numerai_nb.sandbox import Sandbox, SandboxSpec, sandbox_env

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    "The Chromium to use: $CHROMIUM, else the first of BROWSERS on the PATH."
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.fail("no Chromium found: `make browser` installs it (as root), or install it with "
                "`sudo apt-get install -y chromium`, or set CHROMIUM=/path/to/chrome")


def headless(*args, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([find_browser(), *flags, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def train_report(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with Sandbox(home / "sandbox", SandboxSpec(train_eras=24, validation_eras=10)) as sandbox:
        env = {**sandbox_env(sandbox), "NUMERAI_NB_HOME": str(home), "LGBM_DEVICE": "cpu",
               "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
        with environment({**env, "WANDB_API_KEY": None}):
            report = run_pipeline("train", {"feature_set": "small", "n_estimators": 20,
                                            "every_nth_era": 1}, home / "run", attach=False)
    assert report.exit_code == 0, report.error
    return report


def test_chromium_shows_the_metrics_table_and_the_plots(train_report, tmp_path):
    done = headless("--dump-dom", train_report.html.as_uri(), profile=tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    tables = re.findall(r"<table.*?</table>", dom, re.S)
    metrics = [t for t in tables if "corr_mean" in t and "corr_sharpe" in t]
    assert metrics, "no metrics table in the rendered page"
    assert re.search(r"corr_mean</t[hd]>\s*<td>-?\d", metrics[0]), metrics[0][:2000]
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) >= 2, f"{len(images)} plots on the page"
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_chromium_renders_a_page_that_is_not_blank(train_report, tmp_path):
    shot = tmp_path / "report.png"
    done = headless(f"--screenshot={shot}", "--window-size=1200,2400",
                    train_report.html.as_uri(), profile=tmp_path / "profile")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 2400 and pixels[..., :3].std() > 0.05
