"""Run identity: a new submission never silently resumes (or overwrites) an old run; the
same run restarted by its launcher resumes by itself (fne_dist/run_identity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fne_dist.config import ConfigError, load_config
from fne_dist.run_identity import check_new_run, resume_request
from fne_dist.train import check_launch

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def _cfg(tmp_path: Path, *extra: str):
    return load_config(TINY, [f"run.output_dir={tmp_path}", "run.name=r", *extra])


@pytest.mark.parametrize(
    "leftover",
    ["r/metrics.json", "r/checkpoints/step-00000010/meta.json", "ray/r/checkpoint_0/x"],
)
def test_new_submission_over_an_old_run_fails_in_one_line(tmp_path: Path, leftover: str) -> None:
    """Invariant: a finished run, a run with checkpoints, or Ray's storage for the same name
    makes a new submission without checkpoint.resume fail before anything starts, in one line
    naming what is there and both ways out; checkpoint.resume=latest lets it continue."""
    (tmp_path / leftover).parent.mkdir(parents=True)
    (tmp_path / leftover).write_text("{}")
    with pytest.raises(ConfigError) as err:
        check_launch(_cfg(tmp_path), "local", {})
    msg = str(err.value)
    assert "run.name=r already holds a run" in msg and "checkpoint.resume=latest" in msg
    assert "\n" not in msg
    check_launch(_cfg(tmp_path, "checkpoint.resume=latest"), "local", {})


def test_fresh_run_dir_and_config_only_dir_start(tmp_path: Path) -> None:
    """Invariant: an empty run dir, or one where a run died before its first checkpoint
    (config.yaml only), starts a new run."""
    check_new_run(_cfg(tmp_path), {})
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("x: 1")
    check_new_run(_cfg(tmp_path), {})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"SLURM_RESTART_COUNT": "0"}, None),
        ({"SLURM_RESTART_COUNT": "1"}, "latest"),
        ({"TORCHELASTIC_RESTART_COUNT": "2"}, "latest"),
    ],
)
def test_launcher_restarts_resume_by_themselves(
    tmp_path: Path, env: dict[str, str], expected: str | None
) -> None:
    """Invariant: a Slurm requeue (same job, SLURM_RESTART_COUNT > 0) or a torchrun restart
    resumes from the newest checkpoint without being told; a first attempt does not; an
    explicit checkpoint.resume always wins."""
    assert resume_request(_cfg(tmp_path), env) == expected
    assert resume_request(_cfg(tmp_path, "checkpoint.resume=/x/step-1"), env) == "/x/step-1"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text("{}")
    if expected is None:
        with pytest.raises(ConfigError):
            check_new_run(_cfg(tmp_path), env)
    else:
        check_new_run(_cfg(tmp_path), env)
