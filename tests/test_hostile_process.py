"""Hardening, the process: the run directory's owner, signals, a full disk,
non-finite steps, the JSON-lines log. The real-process cases start
``python -m fne_dist.train`` with the tiny config and the DDP twin (no DeepSpeed JIT build)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fne_dist.checkpoint import format as checkpoint_format
from fne_dist.checkpoint.collective import Parts, Target, save_run_checkpoint
from fne_dist.checkpoint.format import CheckpointError, RankState
from fne_dist.checkpoint.validation import find_resumable, list_checkpoints, validate
from fne_dist.config import load_config
from fne_dist.engine import DDPEngine
from fne_dist.fne import SimilarityStats
from fne_dist.interrupt import EXIT_INTERRUPTED
from fne_dist.memory import MomentumMemory
from fne_dist.reporters import JsonLinesReporter
from fne_dist.run_lock import LOCK_NAME, RunDirBusy, RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _strict_json(line: str) -> dict:
    """json.loads that refuses NaN/Infinity (Python's json accepts them; JSON does not)."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train_cmd(tmp: Path, name: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fne_dist.train",
        "--config",
        str(TINY),
        f"run.output_dir={tmp}",
        f"run.name={name}",
        f"data.cache_dir={tmp / 'cache'}",
        "engine.kind=ddp",
        "train.log_every=1",
        *overrides,
    ]


# ---------------------------------------------------------------- the run directory's owner


@pytest.mark.system
@pytest.mark.timeout(300)
def test_hostile_a_live_owner_refuses_a_second_run_in_one_line(tmp_path: Path) -> None:
    """Invariant: while another process holds the run directory's lock (taken here with plain
    fcntl by a separate process, as a first run would), a second run exits 2 with one line
    naming the directory and the owner's pid, before it writes anything there."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"f = open({str(run_dir / LOCK_NAME)!r}, 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write(f'host=elsewhere pid={os.getpid()} started=now\\n'); f.flush()\n"
            "print('held', flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        out = subprocess.run(
            _train_cmd(tmp_path, "r"), cwd=ROOT, env=_env(), capture_output=True, text=True,
            timeout=240, check=False,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert f"{run_dir} is in use by another run" in lines[0]
    assert f"pid={holder.pid}" in lines[0]
    assert not (run_dir / "train_log.jsonl").exists() and not (run_dir / "config.yaml").exists()


def test_hostile_stale_lock_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    """Invariant: a lock file whose holder died (content left, no flock held) is taken over
    with one warning naming the dead owner; while held, a second lock in another open file
    description fails with one line; after release the file is empty and can be taken
    silently."""
    (tmp_path / LOCK_NAME).write_text("host=gone pid=999999 started=yesterday\n")
    warnings: list[str] = []
    lock = RunLock(tmp_path, warnings.append)
    assert len(warnings) == 1 and "pid=999999" in warnings[0] and "stale" in warnings[0]
    assert f"pid={os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(RunDirBusy) as err:
        RunLock(tmp_path, warnings.append)
    assert "\n" not in str(err.value) and f"pid={os.getpid()}" in str(err.value)
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    RunLock(tmp_path, warnings.append).release()
    assert len(warnings) == 1


# ---------------------------------------------------------------- a full disk


def _parts(cfg) -> Parts:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return Parts(
        engine=DDPEngine(model, cfg, total_steps=10),
        momentum=torch.nn.Linear(64, 64),
        memory=MomentumMemory(cfg.memory.size, cfg.model.embed_dim, seed=0, device="cpu"),
        stats=SimilarityStats(cfg.fne.stats_reset, cfg.fne.no_pos_mu, device="cpu"),
    )


def _target(root: Path) -> Target:
    return Target(
        root=root, config_yaml="x: 1\n", layout={"world_size": 1}, run_id=None, keep_last=0,
        rank=0, barrier=lambda: None, local_rank=0,
    )  # fmt: skip


def _state(step: int) -> RankState:
    counters = {"opt_step": step, "micro": step - 1, "epoch": 0, "samples_seen": step}
    return RankState(counters, None)


@contextlib.contextmanager
def _small_disk(where: Path, size: str):
    """A real tmpfs of ``size`` at ``where`` (root only), unmounted afterwards."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root): the patched variant covers a full disk")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("disk", ["patched", pytest.param("tmpfs", marks=pytest.mark.system)])
def test_hostile_disk_full_fails_in_one_line_and_keeps_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: str
) -> None:
    """Invariant: a checkpoint write that hits ENOSPC (a real full tmpfs, or the writer
    raising safetensors' error) ends in one CheckpointError line naming the step directory
    and the cause; no ``step-N.tmp`` is left, and the earlier checkpoint still validates."""
    cfg = load_config(TINY)
    parts = _parts(cfg)
    with contextlib.ExitStack() as stack:
        root = tmp_path / "ckpts"
        if disk == "tmpfs":
            root = stack.enter_context(_small_disk(tmp_path / "mnt", "512k"))
        first = save_run_checkpoint(_target(root), parts, _state(1))
        if disk == "tmpfs":  # fill what is left, so the next checkpoint cannot fit
            with contextlib.suppress(OSError), open(root / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        else:

            def full(*_args, **_kwargs):
                raise SafetensorError(f"Error while serializing: {os.strerror(errno.ENOSPC)}")

            monkeypatch.setattr(checkpoint_format, "save_file", full)  # every writer of the format
        with pytest.raises(CheckpointError) as err:
            save_run_checkpoint(_target(root), parts, _state(2))
        msg = str(err.value)
        assert "\n" not in msg and "step-00000002.tmp" in msg, msg
        assert "No space left on device" in msg, msg
        assert not list(root.glob("*.tmp"))
        assert validate(first)["step"] == 1


# ---------------------------------------------------------------- the JSON-lines log


def test_hostile_log_is_strict_json_and_resume_drops_redone_steps(tmp_path: Path) -> None:
    """Invariant: every train_log.jsonl line is strict JSON (NaN and ±inf written as null,
    nested values too), and ``resumed(step)`` keeps exactly the lines up to ``step`` (a torn
    last line of a killed run goes too), so steps only grow after a resume."""
    path = tmp_path / "train_log.jsonl"
    rep = JsonLinesReporter(path)
    for step in range(5):
        rep.step(step, {"loss": [1.0, float("nan"), float("inf"), -float("inf"), 2.0][step]})
    rep.file.write('{"step": 6, "lo')  # a kill in the middle of a line
    rep.file.flush()
    rep.resumed(3)
    rep.step(3, {"loss": 0.5, "nested": {"x": float("nan")}})
    rep.close()
    docs = [_strict_json(line) for line in path.read_text().splitlines()]
    assert [d["step"] for d in docs] == [1, 2, 3, 4]
    assert [d["loss"] for d in docs] == [1.0, None, None, 0.5]
    assert docs[-1]["nested"] == {"x": None}


# ---------------------------------------------------------------- non-finite steps


def test_hostile_the_skip_decision_sees_every_non_finite_value() -> None:
    """Invariant: a loss or any gradient holding NaN, +inf or -inf (or a gradient norm that
    overflows) asks for a skip; finite ones and absent gradients do not (world size 1: the
    agreement is the identity)."""
    from fne_dist.nonfinite import TrainingDiverged, check_in_row, finite_everywhere, grads_finite

    model = torch.nn.Linear(3, 2)
    assert grads_finite(model)  # no gradients yet
    model(torch.ones(1, 3)).sum().backward()
    assert grads_finite(model) and finite_everywhere(torch.tensor(1.5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not finite_everywhere(torch.tensor(bad))
        saved = model.weight.grad[0, 1].item()
        model.weight.grad[0, 1] = bad
        assert not grads_finite(model)
        model.weight.grad[0, 1] = saved
    model.bias.grad.fill_(3e38)  # finite values, overflowing norm
    assert not grads_finite(model)
    check_in_row(2, 3, 10, 5)
    with pytest.raises(TrainingDiverged, match="3 micro steps in a row"):
        check_in_row(3, 3, 11, 6)


@pytest.mark.system
@pytest.mark.timeout(300)
def test_hostile_non_finite_steps_never_update_weights(tmp_path: Path) -> None:
    """Invariant: with optim.lr=1e30 (the issue's repro: the loss turns NaN), every step with
    a non-finite loss or gradient is skipped, so every checkpoint's weights stay finite; after
    optim.max_nonfinite_steps of them in a row the run stops with one line and exit code 3;
    the log is strict JSON with those losses as null and counts the skipped steps."""
    out = subprocess.run(
        _train_cmd(
            tmp_path, "nan", "optim.lr=1e30", "optim.max_nonfinite_steps=3",
            "checkpoint.every_steps=1", "checkpoint.keep_last=0",
        ),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert (
        len(lines) == 1 and "3 micro steps in a row had a non-finite loss or gradient" in lines[0]
    )
    run_dir = tmp_path / "nan"
    docs = [_strict_json(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert docs[-1]["loss"] is None and docs[-1]["skipped_nonfinite"] >= 2, docs  # the 3rd stops
    saved = list_checkpoints(run_dir / "checkpoints")
    assert saved, "no checkpoint was written"
    for path in saved:
        weights = load_file(str(path / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), path.name


# ---------------------------------------------------------------- SIGINT and SIGTERM


def _wait_for_lines(log: Path, n: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {n} log lines")
        time.sleep(0.2)
    pytest.fail(f"no {n} log lines after {timeout_s} s")


@pytest.mark.system
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("sig", "grace"), [(signal.SIGINT, "30"), (signal.SIGTERM, "0")], ids=["int", "term"]
)
def test_hostile_signal_stops_cleanly_and_resumably(
    tmp_path: Path, sig: signal.Signals, grace: str
) -> None:
    """Invariant: a signal mid-run ends the process with exit code 75 and one line (no
    traceback), leaves no ``step-N.tmp``, and the newest checkpoint validates. With grace
    left (30 s, and a measured checkpoint that fits) it is the stop step's own checkpoint;
    with no grace (0 s) none is written on the way out: the newest is the last scheduled one
    (every 3 steps) at or before the stop step."""
    log = tmp_path / "sig" / "train_log.jsonl"
    proc = subprocess.Popen(
        _train_cmd(
            tmp_path, "sig", "train.epochs=1", "checkpoint.every_steps=3",
            "checkpoint.keep_last=0", f"checkpoint.stop_grace_s={grace}",
        ),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_lines(log, 5, proc, timeout_s=240)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    lines = stderr.strip().splitlines()
    assert proc.returncode == EXIT_INTERRUPTED, stdout[-3000:] + stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    stopped = int(re.search(r"at optimizer step (\d+)", lines[0]).group(1))
    root = tmp_path / "sig" / "checkpoints"
    assert not list(root.glob("*.tmp"))
    newest, meta = find_resumable("latest", root, print)
    expected = stopped if sig == signal.SIGINT else stopped - stopped % 3
    assert meta["step"] == expected, (lines[0], newest)
    steps = [_strict_json(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == stopped


@pytest.mark.system
@pytest.mark.timeout(120)
def test_hostile_ranks_agree_to_stop_when_one_gets_the_signal(tmp_path: Path) -> None:
    """Invariant: SIGTERM reaching only rank 1 (during its second step) stops both ranks of a
    real 2-rank gloo group before the same next step, through the per-step all-reduce of
    ``agreed_batches``: each trained exactly micro steps 0 and 1, both saw the stop agreed,
    and only rank 1 received a signal (no rank is left waiting in a collective)."""
    from fne_dist.distributed.launch import free_port
    from tests.test_data_agreement import _shards

    data = tmp_path / "data"
    data.mkdir()
    spec = _shards(data)
    script = ROOT / "tests" / "dist_scripts" / "stop_agreement.py"
    port, procs = free_port(), []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(script), spec, str(tmp_path)]
        out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, **out))
    try:
        logs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], logs
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [[m for m, _ in r["trained"]] for r in ranks] == [[0, 1], [0, 1]], ranks
    assert [r["agreed"] for r in ranks] == [True, True]
    assert [r["signal"] for r in ranks] == [None, "SIGTERM"]
