"""The environment a run sets up for the Ray instance it starts for itself (the default run's
launcher): what only a shared cluster uses is switched off there, and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fne_dist.config import load_config
from fne_dist.distributed import ray_launcher

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # run_with_ray sets it for every run


class _Stop(Exception):
    pass


def _unset(monkeypatch: pytest.MonkeyPatch, *keys: str) -> None:
    """Unset ``keys`` for this test, and leave them as they were after it (also what
    ``run_with_ray`` sets in os.environ: a plain delenv of an unset key records nothing)."""
    for key in keys:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def _env_at_init(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *overrides: str) -> dict:
    """os.environ as ``run_with_ray`` leaves it when it calls ``ray.init`` (which is stopped
    there: nothing starts)."""
    import ray

    seen: dict = {}

    def fake_init(*_args, **kwargs):
        seen.update(env=dict(os.environ), kwargs=kwargs)
        raise _Stop

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "dist.workers=2", *overrides])
    with pytest.raises(_Stop):
        ray_launcher.run_with_ray(cfg)
    return seen


def test_a_run_owned_instance_starts_no_idle_workers_and_no_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: a local instance is started with prestarted workers and the preemption
    watcher off (the raylet and Ray Train's controller read them from the environment), and
    a value the user set wins."""
    _unset(monkeypatch, "RAY_ADDRESS", *ray_launcher.local_instance_env(), START_TIMEOUT)
    seen = _env_at_init(monkeypatch, tmp_path)
    assert "address" not in seen["kwargs"]
    for key, value in ray_launcher.local_instance_env().items():
        assert seen["env"][key] == value, key
    _unset(monkeypatch, *ray_launcher.local_instance_env())
    monkeypatch.setenv(ray_launcher.PRESTART_VAR, "1")
    seen = _env_at_init(monkeypatch, tmp_path)
    assert seen["env"][ray_launcher.PRESTART_VAR] == "1"


def test_a_given_cluster_keeps_its_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: joining a cluster (dist.ray_address) changes none of these settings: its
    workers, watcher and autoscaler are the cluster's."""
    _unset(monkeypatch, "RAY_ADDRESS", *ray_launcher.local_instance_env(), START_TIMEOUT)
    seen = _env_at_init(monkeypatch, tmp_path, "dist.ray_address=127.0.0.1:6379")
    assert seen["kwargs"]["address"] == "127.0.0.1:6379"
    for key in ray_launcher.local_instance_env():
        assert key not in seen["env"], key


def _callback_names(own_instance: bool, tmp_path: Path) -> list[str]:
    from ray.train import RunConfig, ScalingConfig

    trainer = ray_launcher.trainer_class(own_instance)(
        lambda: None,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path)),
    )
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_a_run_owned_instance_drops_only_the_cleaner_and_the_datasets_callbacks(
    tmp_path: Path,
) -> None:
    """Invariant: on an instance the run started, Ray Train's callbacks are its defaults less
    the placement-group cleaner and the datasets manager (each one more actor process); the
    process group, the metrics (Prometheus) and user callbacks stay. On a cluster the trainer
    is Ray's own. Two trainers compared: ours against Ray's."""
    own, theirs = _callback_names(True, tmp_path), _callback_names(False, tmp_path)
    assert set(ray_launcher.NOT_ON_OWN_INSTANCE) <= set(theirs)  # they exist in this Ray
    assert own == [name for name in theirs if name not in ray_launcher.NOT_ON_OWN_INSTANCE]
    assert {"BackendSetupCallback", "ControllerMetricsCallback", "WorkerMetricsCallback"} <= set(
        own
    )
    from ray.train.torch import TorchTrainer

    assert ray_launcher.trainer_class(False) is TorchTrainer
