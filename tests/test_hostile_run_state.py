"""Runs that would lose or misuse state: a checkpoint.dir shared by two runs, a resume whose
settings or data changed, a requeue before the first checkpoint, a stop during the feature-cache
build, unwritable output locations, rank files moved between ranks or steps, and checkpoint
parts of another shape. Each is refused in one line (exit status 2) or handled, never silently
wrong. In-process: the functions the loop calls, on checkpoints written by the real writer."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from fne_dist import loop, run_identity
from fne_dist.checkpoint.collective import Parts, Target, load_run_checkpoint, save_run_checkpoint
from fne_dist.checkpoint.format import (
    ENGINE_TAG,
    META,
    CheckpointError,
    RankState,
    data_files,
    hash_files,
    read_rank_files,
    write_rank_files,
)
from fne_dist.checkpoint.validation import validate
from fne_dist.checkpointer import Checkpointer, LauncherCheckpoints, resume_source
from fne_dist.config import ConfigError, load_config, save_config
from fne_dist.data.stream import RankPosition
from fne_dist.engine import DDPEngine
from fne_dist.fne import SimilarityStats
from fne_dist.interrupt import Interrupted, handle_signals
from fne_dist.memory import MomentumMemory
from fne_dist.reporters import Reporter
from fne_dist.run_lock import LOCK_NAME, RunDirBusy, RunLock, owned
from fne_dist.state import TrainState
from fne_dist.towers import Towers
from fne_dist.train import check_launch
from fne_dist.train import main as train_main
from tests.shard_factory import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _cfg(tmp_path: Path, *extra: str):
    return load_config(TINY, [f"run.output_dir={tmp_path}", "run.name=r", *extra])


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- one owner per checkpoint.dir


def test_hostile_checkpoint_dir_has_one_owner_run(tmp_path: Path) -> None:
    """Invariant: while run a holds its run directory and checkpoint.dir, run b (another
    run.name, the same checkpoint.dir) is refused in one line naming checkpoint.dir and a's
    name, and holds nothing afterwards; two runs never replace each other's step-N."""
    shared = tmp_path / "ckpts"
    with owned(tmp_path / "a", 0, shared, "a"):
        with pytest.raises(RunDirBusy) as err, owned(tmp_path / "b", 0, shared, "b"):
            pass
        line = _one_line(err)
        assert f"checkpoint.dir {shared} is in use by another run" in line
        assert "run.name=a" in line and f"pid={os.getpid()}" in line
        RunLock(tmp_path / "b").release()  # b's run directory was let go
    with owned(tmp_path / "b", 0, shared, "b"):  # a ended: b may take it
        pass


def test_hostile_deleting_the_lock_file_does_not_free_the_directory(tmp_path: Path) -> None:
    """Invariant: the lock is on the directory itself: a second run whose owner's .run.lock
    was deleted (so it would lock a new file of the same name) is still refused."""
    first = RunLock(tmp_path)
    try:
        (tmp_path / LOCK_NAME).unlink()
        with pytest.raises(RunDirBusy) as err:
            RunLock(tmp_path)
        assert f"{tmp_path} is in use by another run" in _one_line(err)
    finally:
        first.release()
    RunLock(tmp_path).release()


def test_hostile_train_refuses_a_checkpoint_dir_held_by_another_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Invariant: ``python -m fne_dist.train`` locks its checkpoint.dir, not only its run
    directory: with another run holding that checkpoint.dir it exits 2 in one line."""
    shared = tmp_path / "shared"
    holder = RunLock(shared, run_name="other")
    try:
        code = train_main(
            ["--config", str(TINY), f"run.output_dir={tmp_path}", "run.name=mine",
             f"checkpoint.dir={shared}", "engine.kind=ddp"]
        )  # fmt: skip
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"checkpoint.dir {shared} is in use by another run" in err and "run.name=other" in err


# ---------------------------------------------------------------- checkpoints written for real


def _parts(cfg, width: int = 64) -> Parts:
    torch.manual_seed(0)
    return Parts(
        engine=DDPEngine(torch.nn.Linear(width, width), cfg, total_steps=10),
        momentum=torch.nn.Linear(width, width),
        memory=MomentumMemory(cfg.memory.size, cfg.model.embed_dim, seed=0, device="cpu"),
        stats=SimilarityStats(cfg.fne.stats_reset, cfg.fne.no_pos_mu, device="cpu"),
    )


def _save(root: Path, cfg, step: int, data: dict | None = None) -> Path:
    """A checkpoint at ``step`` written by the real writer (the DDP twin's engine files), with
    ``data`` (the training shards' identity) in its meta.json if given."""
    target = Target(
        root=root, config_yaml=(root.parent / "config.yaml").read_text(),
        layout={"world_size": 1}, run_id=None, keep_last=0, rank=0,
        barrier=lambda: None, local_rank=0,
    )  # fmt: skip
    target.data = data
    state = TrainState.fresh(torch.device("cpu"), warm=False)
    state.opt_step, state.n_micro, state.micro, state.epoch = step, step, step - 1, 0
    state.position = RankPosition(epoch=0, step=step, consumers=[])
    return save_run_checkpoint(target, _parts(cfg), state.to_rank_state(16, True))


def _rehash(directory: Path) -> dict:
    """Rewrite meta.json's table as a tamperer would, so only the new checks can object."""
    meta = json.loads((directory / META).read_text())
    names = [str(p.relative_to(directory)) for p in data_files(directory)]
    meta["files"] = hash_files(directory, names)
    (directory / META).write_text(json.dumps(meta))
    return validate(directory)


@pytest.fixture
def written(tmp_path: Path):
    """A run's config and checkpoints at steps 2 and 4 (one rank)."""
    cfg = _cfg(tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    root = tmp_path / "ckpts"
    return cfg, _save(root, cfg, 2), _save(root, cfg, 4)


# ---------------------------------------------------------------- rank files bound to rank and step


def test_hostile_rank_files_of_another_step_are_refused(written, tmp_path: Path) -> None:
    """Invariant: step-2 rank files copied into step-4 (meta.json re-hashed) are refused in
    one line naming the file and both steps: step-4 weights never resume with step-2's data
    position and RNG."""
    cfg, step2, step4 = written
    for name in ("rank-00000.json", "rank-00000.safetensors"):
        shutil.copy2(step2 / name, step4 / name)
    meta = _rehash(step4)
    with pytest.raises(CheckpointError) as err:
        load_run_checkpoint(step4, meta, {"world_size": 1}, _parts(cfg), rank=0)
    line = _one_line(err)
    assert "rank-00000" in line and "step 2" in line and "step 4" in line


def test_hostile_swapped_rank_files_are_refused(written) -> None:
    """Invariant: in a two-rank checkpoint whose rank-0 and rank-1 files were swapped (meta.json
    re-hashed), each rank's loader refuses the other's file in one line."""
    _, _, step4 = written
    write_rank_files(step4, 1, RankState({"opt_step": 4}, None))
    for ext in ("json", "safetensors"):
        a, b = step4 / f"rank-00000.{ext}", step4 / f"rank-00001.{ext}"
        a.rename(step4 / "swap")
        b.rename(a)
        (step4 / "swap").rename(b)
    _rehash(step4)
    for rank in (0, 1):
        with pytest.raises(CheckpointError) as err:
            read_rank_files(step4, rank, 4)
        assert f"holds rank {1 - rank}'s state" in _one_line(err)


def test_hostile_intact_rank_files_still_load(written) -> None:
    """Invariant: the binding refuses only moved files: an intact checkpoint's rank state
    loads with its counters."""
    cfg, _, step4 = written
    meta = validate(step4)
    saved = load_run_checkpoint(step4, meta, {"world_size": 1}, _parts(cfg), rank=0)
    assert saved.counters["opt_step"] == 4


# ---------------------------------------------------------------- parts of another shape


def test_hostile_rank_file_without_epoch_is_one_line(written) -> None:
    """Invariant: a rank file lacking a counter the loop needs (here ``epoch``), re-hashed, is
    one CheckpointError naming the file and the missing key, not a KeyError traceback."""
    cfg, _, step4 = written
    path = step4 / "rank-00000.json"
    doc = json.loads(path.read_text())
    del doc["counters"]["epoch"]
    path.write_text(json.dumps(doc))
    meta = _rehash(step4)
    saved = load_run_checkpoint(step4, meta, {"world_size": 1}, _parts(cfg), rank=0)
    with pytest.raises(CheckpointError) as err:
        TrainState.from_rank_state(saved, torch.device("cpu"), 10, 0, str(path))
    line = _one_line(err)
    assert str(path) in line and "'epoch'" in line


def test_hostile_engine_state_naming_a_missing_tensor_is_one_line(written) -> None:
    """Invariant: an engine/state.json naming a tensor its safetensors file lacks (re-hashed)
    is one CheckpointError naming both, not a KeyError traceback."""
    cfg, _, step4 = written
    path = step4 / ENGINE_TAG / "state.json"
    text = path.read_text()
    first = json.loads(text)["dict"][0][1]  # the model's state dict
    name = first["dict"][0][1]["tensor"]
    path.write_text(text.replace(json.dumps(name), json.dumps("state.nowhere"), 1))
    meta = _rehash(step4)
    with pytest.raises(CheckpointError) as err:
        load_run_checkpoint(step4, meta, {"world_size": 1}, _parts(cfg), rank=0)
    line = _one_line(err)
    assert "state.nowhere" in line and "state.safetensors" in line


def test_hostile_weights_of_another_model_are_one_line(written) -> None:
    """Invariant: engine state of another architecture (as after changing model.head) that
    reaches load_state_dict is one CheckpointError line, not torch's RuntimeError."""
    cfg, _, step4 = written
    meta = validate(step4)
    with pytest.raises(CheckpointError) as err:
        load_run_checkpoint(step4, meta, {"world_size": 1}, _parts(cfg, 32), rank=0)
    assert "does not fit this run's model" in _one_line(err)


# ---------------------------------------------------------------- a resume with changed settings


@pytest.mark.parametrize(
    ("override", "key", "old", "new"),
    [
        ("optim.lr=1e-5", "optim.lr", "0.001", "1e-05"),
        ("model.head=mlp", "model.head", "linear", "mlp"),
        ("run.seed=7", "run.seed", "3407", "7"),
    ],
)
def test_hostile_resume_refuses_a_setting_its_state_depends_on(
    written, tmp_path: Path, override: str, key: str, old: str, new: str
) -> None:
    """Invariant: resuming with a setting of RESUME_MUST_MATCH changed (the restored optimizer
    would silently keep the old lr; other weights would not load) is refused in one line naming
    the key with both values, before any state loads."""
    _, _, step4 = written
    with pytest.raises(ConfigError) as err:
        run_identity.check_resume_config(
            step4, _cfg(tmp_path, override), validate(step4).get("data")
        )
    line = _one_line(err)
    assert f"{key}={new}" in line and f"checkpoint's {key}={old}" in line


def test_hostile_resume_applies_the_other_settings(written, tmp_path: Path) -> None:
    """Invariant: settings outside RESUME_MUST_MATCH (the length of training, logging,
    evaluation, the loss) may change on resume: no refusal."""
    _, _, step4 = written
    cfg = _cfg(tmp_path, "train.epochs=0.5", "train.log_every=1", "fne.loss=infonce")
    run_identity.check_resume_config(step4, cfg, validate(step4).get("data"))


def _ds_file(path: Path, zero: dict) -> str:
    path.write_text(json.dumps({"zero_optimization": zero}))
    return f"engine.deepspeed_config={path}"


def test_hostile_resume_refuses_a_deepspeed_config_its_state_depends_on(tmp_path: Path) -> None:
    """Invariant: a checkpoint records the DeepSpeed settings its engine state was written for
    (DEEPSPEED_MUST_MATCH, from the resolved config: meta.json ``deepspeed``); resuming through
    the Checkpointer with an engine.deepspeed_config whose file offloads the optimizer where
    the checkpoint's did not is refused in one line naming the setting with both values,
    before any state loads; the same settings in a moved file with another bucket size (not
    state-shaping) resume."""
    data = tmp_path / "data"
    write_dataset(data, [4, 4])
    base = [f"data.train={data}/*.tar", "engine.zero_stage=1"]
    cfg = _cfg(tmp_path, *base, _ds_file(tmp_path / "ds.json", {"stage": 1}))
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    writer = Checkpointer(cfg, run_dir, _parts(cfg), {"world_size": 1}, Reporter())
    state = TrainState.fresh(torch.device("cpu"), warm=False)
    state.opt_step, state.n_micro, state.micro, state.epoch = 2, 2, 1, 0
    state.position = RankPosition(epoch=0, step=2, consumers=[])
    writer.save(state)
    step = run_dir / "checkpoints" / "step-00000002"

    def resume(*extra: str):
        again = _cfg(tmp_path, *base, "checkpoint.resume=latest", *extra)
        return Checkpointer(again, run_dir, _parts(again), {"world_size": 1}, Reporter()).resume()

    offload = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    with pytest.raises(ConfigError) as err:
        resume(_ds_file(tmp_path / "ds.json", offload))  # the same path, edited
    line = _one_line(err)
    assert "zero_optimization.offload_optimizer.device=cpu" in line, line
    assert "checkpoint's had zero_optimization.offload_optimizer.device=none" in line, line
    assert f"engine.deepspeed_config={tmp_path / 'ds.json'}" in line, line
    moved = _ds_file(tmp_path / "moved.json", {"stage": 1, "reduce_bucket_size": 1000})
    assert resume(moved).directory == step
    assert validate(step)["deepspeed"]["zero_optimization.offload_optimizer.device"] == "none"


def test_hostile_resume_reuses_the_data_position_only_for_the_same_shards(
    tmp_path: Path,
) -> None:
    """Invariant: a checkpoint records a fingerprint of its training shards; resuming with
    other shards (another pattern, or other files behind the same one) is refused in one line
    naming data.train, while the same shards moved elsewhere resume."""
    first = tmp_path / "first"
    write_dataset(first, [4, 4])
    cfg = _cfg(tmp_path, f"data.train={first}/*.tar")
    save_config(cfg, tmp_path / "config.yaml")
    step = _save(tmp_path / "ckpts", cfg, 2, run_identity.data_identity(cfg))
    data = validate(step)["data"]
    other = tmp_path / "other"
    write_dataset(other, [4, 4, 4, 4])
    with pytest.raises(ConfigError) as err:
        run_identity.check_resume_config(step, _cfg(tmp_path, f"data.train={other}/*.tar"), data)
    line = _one_line(err)
    assert f"data.train={other}/*.tar holds other shards" in line and str(first) in line
    write_dataset(first, [4, 4, 4])  # the same pattern, another file behind it
    with pytest.raises(ConfigError, match="the files behind the pattern changed"):
        run_identity.check_resume_config(step, cfg, data)
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    (moved / "part-000002.tar").unlink()
    (moved / "sizes.json").write_text(json.dumps({"part-000000.tar": 4, "part-000001.tar": 4}))
    run_identity.check_resume_config(step, _cfg(tmp_path, f"data.train={moved}/*.tar"), data)


# ---------------------------------------------------------------- a requeue before any checkpoint


def test_hostile_requeue_before_the_first_checkpoint_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: a Slurm requeue (SLURM_RESTART_COUNT > 0) of a run that wrote no checkpoint
    starts afresh, saying so; a requeue with only invalid checkpoints, or an explicit
    checkpoint.resume=latest with none, still fails in one line (nothing is overwritten)."""
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    root, scratch = tmp_path / "ckpts", tmp_path / "scratch"
    lines: list[str] = []

    def source(cfg):
        return resume_source(cfg, str(root), scratch, LauncherCheckpoints(), lines.append)

    assert source(_cfg(tmp_path)) is None
    assert any("starting afresh" in line for line in lines), lines
    root.mkdir()
    assert source(_cfg(tmp_path)) is None
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        source(_cfg(tmp_path, "checkpoint.resume=latest"))
    (root / "step-00000003").mkdir()  # there was one, now broken: not a fresh start
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        source(_cfg(tmp_path))


class _Restores(LauncherCheckpoints):
    """A launcher that hands back ``path`` after restarting the run (as Ray Train does)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def restored(self) -> Path:
        return self.path


def test_a_launcher_restart_resumes_from_the_newer_of_its_record_and_this_runs_newest(
    tmp_path: Path,
) -> None:
    """Invariant: after a launcher's restart the run resumes from the newer of the checkpoint
    the launcher hands back and this run's (``run.id``) newest valid one in checkpoint.dir (a
    worker can die between writing a checkpoint and the launcher registering it); another
    run's checkpoint there does not count. The source is the checkpointer's: no reporter."""
    cfg = _cfg(tmp_path, "run.id=r1")
    save_config(cfg, tmp_path / "config.yaml")
    root = tmp_path / "ckpts"
    registered, newer = _save(root, cfg, 2), _save(root, cfg, 4)  # run_id: none (not r1)

    def source(launcher: LauncherCheckpoints) -> Path | None:
        return resume_source(cfg, str(root), tmp_path / "scratch", launcher, print)

    assert source(_Restores(registered)) == registered
    meta = json.loads((newer / META).read_text())
    (newer / META).write_text(json.dumps({**meta, "run_id": "r1"}))  # now this run's
    assert source(_Restores(registered)) == newer
    assert source(LauncherCheckpoints()) == newer


# ---------------------------------------------------------------- a stop during the cache build


class _TextTower(torch.nn.Module):
    """A frozen text tower whose forward delivers SIGTERM to this process on its first call,
    as Slurm would in the middle of the feature-cache build."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def tokenize(self, captions: list[str], fixed_length: bool = False) -> dict[str, torch.Tensor]:
        ids = torch.ones(len(captions), 4, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": ids}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.zeros(len(ids), 8)


def test_hostile_sigterm_stops_the_feature_cache_build_and_leaves_no_cache(
    tmp_path: Path,
) -> None:
    """Invariant: SIGTERM during the feature-cache build (frozen text tower) stops it before the
    next batch with Interrupted (exit 75), not after the whole train/val/test build; no cache
    directory, complete or partial, is left, so the next run builds it anew."""
    data = tmp_path / "data"
    write_dataset(data, [70, 70, 70])  # batches of 64: the signal comes in the first
    spec = f"{data}/*.tar"
    cfg = _cfg(
        tmp_path, f"data.train={spec}", f"data.val={spec}", f"data.test={spec}",
        "model.text.frozen=true", f"data.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    tower = _TextTower()
    with handle_signals() as stop, pytest.raises(Interrupted) as err:
        loop.open_data(cfg, Towers.given(cfg.model, None, tower), 0, 1, lambda: stop.signal_name)
    assert tower.calls == 1
    line = _one_line(err)
    assert line.startswith("SIGTERM during the feature cache train build")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


# ---------------------------------------------------------------- unwritable output locations


def _symlink_loop(where: Path) -> Path:
    os.symlink(where.with_name("loop-b"), where)
    os.symlink(where, where.with_name("loop-b"))
    return where


# the read-only case mounts a tmpfs (a process): the system tier
@pytest.mark.parametrize(
    "kind", ["file", "symlink_loop", pytest.param("read_only", marks=pytest.mark.system)]
)
@pytest.mark.parametrize("key", ["checkpoint.dir", "run.output_dir"])
def test_hostile_unwritable_output_location_fails_at_launch(
    tmp_path: Path, key: str, kind: str
) -> None:
    """Invariant: a run directory or checkpoint.dir that is a file, a symlink loop or read-only
    is refused at launch in one line naming the setting and the cause (exit 2), not after
    training at the first checkpoint or the final weights."""
    place = tmp_path / "place"
    if kind == "file":
        place.write_text("not a directory")
    elif kind == "symlink_loop":
        _symlink_loop(place)
    else:
        place.mkdir()
        place.chmod(0o555)
        if os.access(place, os.W_OK):  # root writes anyway: a read-only mount is needed
            mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(place)],
                capture_output=True, check=False,
            )  # fmt: skip
            if mounted.returncode != 0:
                pytest.skip("cannot make a read-only directory for root here")
    value = place if key == "checkpoint.dir" else place / "runs"
    if key == "run.output_dir" and kind != "read_only":
        value = place  # the run directory would be inside a file or a loop
    try:
        with pytest.raises(ConfigError) as err:
            check_launch(_cfg(tmp_path, f"{key}={value}"), "local", {})
    finally:
        if kind == "read_only":
            subprocess.run(["umount", "-l", str(place)], capture_output=True, check=False)
            place.chmod(0o755)
    line = _one_line(err)
    assert line.startswith(f"{key}={value} is not a writable directory"), line


def test_hostile_full_disk_at_the_final_weights_keeps_the_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: when the final model.safetensors cannot be written (a full disk), metrics.json
    is written anyway (before the weights), no partial weights file is left, and the failure is
    one line naming the file, the cause and where the weights still are."""

    def full(*_args, **_kwargs):
        raise SafetensorError(f"Error while serializing: {os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(loop, "save_file", full)
    history = {"test": {"rsum": 1.5}, "loss": float("nan")}
    line = loop.write_results(tmp_path, history, {"w": torch.ones(2)}, checkpointed=True)
    assert line is not None and "\n" not in line
    assert "model.safetensors" in line and "No space left on device" in line
    assert "newest checkpoint holds the same weights" in line
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "test": {"rsum": 1.5},
        "loss": None,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
