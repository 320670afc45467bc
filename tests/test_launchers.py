"""Every launcher runs the one training loop, and bad input fails fast with one line.

`python -m fne_dist.train` on the tiny config (threads pinned to 1, batch 8, 0.05 epochs) is run
for real under Ray Train, torchrun, the deepspeed launcher, accelerate and srun-style Slurm
variables (no Slurm daemon: the variables srun would set), at world size 2 and 1. Each launcher
runs once per world size in a module-scoped fixture; the tests share those runs.

Isolation (one sandbox per module, tests/launch_helpers.py): every run gets its own directory
and a free loopback port, a private Ray temp dir, and a marker variable by which whatever it
left is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.launch_helpers import (
    FAIL_FAST_S,
    Run,
    Sandbox,
    assert_same_results,
    launch,
    reap,
    run_launcher,
    sandbox_env,
    train_args,
)

pytestmark = pytest.mark.system

# ---------------------------------------------------------------------------------------------
# fixtures: one sandbox, and each launcher run once per world size


@pytest.fixture(scope="module")
def sandbox(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Sandbox]:
    # Short: Ray's socket paths under RAY_TMPDIR must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fnr", dir="/tmp"))
    marker = uuid.uuid4().hex
    box = Sandbox(sandbox_env(ray_tmp, marker), tmp_path_factory.mktemp("launch"), ray_tmp, marker)
    t0 = time.monotonic()
    yield box
    reap(marker, grace_s=5.0)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and box.timings:
        with capture.global_and_fixture_disabled():  # the timings reach the terminal even so
            reporter.write_line("")
            reporter.write_line(f"launcher runs (wall s), {time.monotonic() - t0:.0f} s in all:")
            for name, seconds in box.timings.items():
                reporter.write_line(f"  {name:<28} {seconds:6.1f}")


IN_PLACE = ("torchrun", "deepspeed", "accelerate", "srun")


@pytest.fixture(scope="module")
def world2(sandbox: Sandbox) -> dict[str, Run]:
    """The same 2-rank config under every launcher (in place first: they warm DeepSpeed's
    extension cache; then Ray, auto-selected by dist.workers=2)."""
    return {name: launch(sandbox, name, 2) for name in (*IN_PLACE, "ray")}


@pytest.fixture(scope="module")
def world1(sandbox: Sandbox) -> dict[str, Run]:
    # CI time: one in-place launcher stands for all four at world size 1 (they differ only in
    # the variables rank_env reads, which test_rank_env covers); every launcher, Ray included,
    # runs at world size 2 above and gives the identical result there.
    return {name: launch(sandbox, name, 1) for name in ("local", "torchrun")}


# ---------------------------------------------------------------------------------------------
# 1. Ray Train, 2 CPU workers


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_two_workers_run_end_to_end(world2: dict[str, Run], sandbox: Sandbox) -> None:
    """Invariant: with dist.workers=2 and no launcher variables, `python -m fne_dist.train`
    starts its own local Ray instance (never another cluster's: a session appears under our
    RAY_TMPDIR), runs 2 Ray Train workers on loopback, writes metrics.json with world size 2
    and test metrics, shows rank 0's final summary in the driver's output, exits 0 and leaves
    no process behind (the driver shut its Ray instance down)."""
    run = world2["ray"]
    assert run.returncode == 0, run.tail()
    assert "Started a local Ray instance" in run.output, run.tail()
    assert list((sandbox.ray_tmp / "ray").glob("session_*")), "Ray did not use our RAY_TMPDIR"
    assert "RayTrainWorker" in run.output and "world_rank=1" in run.output, run.tail()
    assert "ip=127.0.0.1" in run.output, run.tail()  # workers registered on loopback
    metrics = run.metrics()
    steps = metrics["steps"]
    assert metrics["world_size"] == 2 and steps > 3  # past the 3 warm-up steps
    assert {"rsum", "group_rsum", "i2t_r1", "t2i_r10"} <= set(metrics["test"])
    assert 0 <= metrics["test"]["rsum"] <= 600
    assert any(h.get("warmup") == 0.0 for h in metrics["history"])  # FNE ran after warm-up
    for line in ("test  i2t R@1/5/10", "group-aware rsum", f"steps {steps} on 2 rank(s)"):
        assert line in run.stdout, f"summary line {line!r} missing from the driver's output"
    assert run.leftovers == [], f"processes outlived the Ray run: {run.leftovers}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_console_shows_one_short_line_per_window(world2: dict[str, Run]) -> None:
    """Invariant: under Ray the console carries rank 0's short progress line once per log
    window (step/total, losses, lr, samples/s, time left, FNE) and not Ray Train's per-report
    ``Reporting training result N: TrainingReport(...)`` dump of every metric (from any rank)
    nor its ``Checkpoint successfully created at: Checkpoint(...)`` line per checkpoint (the
    run registers its final checkpoint with Ray Train); every metric stays in
    train_log.jsonl."""
    run = world2["ray"]
    assert run.returncode == 0, run.tail()
    print(f"\nray console: {run.output.count('Reporting training result')} report dumps, "
          f"{run.output.count('Checkpoint successfully created')} checkpoint lines, "
          f"{len(list((run.run_dir / 'checkpoints').glob('step-*')))} checkpoints")  # fmt: skip
    assert list((run.run_dir / "checkpoints").glob("step-*")), run.tail()
    assert "Reporting training result" not in run.output, run.tail()
    assert "Checkpoint successfully created" not in run.output, run.tail()
    lines = [line for line in run.stdout.splitlines() if "] step " in line and " | epoch " in line]
    log = [json.loads(line) for line in (run.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == len(log) >= 2, run.tail()
    assert all("[rank 0] step " in line for line in lines), lines  # rank 0 only
    for line in lines:
        assert "| loss " in line and "(i2t " in line and "samples/s" in line, line
        assert "fnd_" not in line and "=" not in line.split("[rank 0]")[1], line
    assert "| FNE gate " in lines[-1], lines[-1]
    assert {"fnd_n_eval", "grad_norm", "mu_pos"} <= set(log[-1]), set(log[-1])


# ---------------------------------------------------------------------------------------------
# 2. every in-place launcher with 2 processes: the same run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_launchers_give_identical_results(world2: dict[str, Run]) -> None:
    """Invariant: torchrun, the deepspeed launcher, accelerate (with the multi-node config
    cluster/accelerate/multi_node.yaml, on the CPU) and srun-style variables each start 2 ranks
    that train in place (not through Ray) with world size 2, and, since the loop never learns
    who launched it (same seeds, data order and threads), all of them and the Ray run give
    bit-identical test metrics and logged losses."""
    for name in IN_PLACE:
        run = world2[name]
        assert run.returncode == 0, run.tail()
        assert "RayTrainWorker" not in run.output, f"{name} went through Ray"
        assert "rank 0/2 on cpu" in run.stdout, run.tail()
        assert run.metrics()["world_size"] == 2, name
        assert run.leftovers == [], (name, run.leftovers)
    assert_same_results(world2, reference="torchrun")


# ---------------------------------------------------------------------------------------------
# 3. world size 1 through every launcher: the single-process result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_world_size_one_under_a_launcher_matches_single_process(world1: dict[str, Run]) -> None:
    """Invariant: one rank under a launcher (torchrun: a process group of one) is exactly the
    plain single-process run (no process group): the world-size-1 collectives are identities
    and threads are pinned, so equality is exact."""
    for name, run in world1.items():
        assert run.returncode == 0, run.tail()
        assert run.metrics()["world_size"] == 1, name
        assert run.leftovers == [], (name, run.leftovers)
    assert "rank 0/1 on cpu" in world1["torchrun"].stdout, world1["torchrun"].tail()
    assert_same_results(world1, reference="local")


# ---------------------------------------------------------------------------------------------
# 4. bad input: one line, non-zero, before any worker starts, never a hang

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
SRUN_2 = {
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_LOCALID": "0",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "overrides, env, needles",
    [
        pytest.param(
            ["memory.size=10"], {}, ["memory.size=10", "global batch (8 × 2"], id="memory-ray"
        ),
        pytest.param(  # in place: the world size comes from the launcher, not dist.workers
            ["memory.size=12", "dist.workers=1"],
            SRUN_2,
            ["memory.size=12", "8 × 2 ranks"],
            id="memory-srun",
        ),
        pytest.param(["engine.precision=fp16"], {}, ["fp16", "CPU"], id="fp16-cpu"),
        pytest.param(
            ["engine.precision=fp16", "engine.device=auto"],
            {},
            ["fp16", "no CUDA device"],
            id="fp16-auto",
            marks=NO_GPU,
        ),
        pytest.param(
            ["engine.device=cuda"],
            {},
            ["engine.device=cuda", "no CUDA device"],
            id="cuda",
            marks=NO_GPU,
        ),
    ],
)
def test_bad_config_fails_in_one_line_before_workers(
    sandbox: Sandbox,
    request: pytest.FixtureRequest,
    overrides: list[str],
    env: dict[str, str],
    needles: list[str],
) -> None:
    """Invariant: a config the run cannot honour (memory smaller than the global batch, fp16 on
    the CPU, cuda without a GPU) exits 2 with a one-line `error:` naming the key, before any
    Ray instance or worker starts (dist.workers=2 would otherwise start Ray)."""
    name = "bad-" + request.node.callspec.id
    cmd = [sys.executable, *train_args(2, *overrides)]
    run = run_launcher(sandbox, name, [cmd], [env], timeout_s=FAIL_FAST_S)
    assert run.returncode == 2, run.tail()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.tail()
    for needle in needles:
        assert needle in lines[0]
    assert "Ray" not in run.output and "rank 0/" not in run.stdout, run.tail()
    assert run.leftovers == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_more_ray_workers_than_cpus_fails_before_workers(sandbox: Sandbox) -> None:
    """Invariant: 4 workers × 1 CPU on a local Ray instance with fewer CPUs is refused with one
    `error:` line and exit code 2 before the local Ray instance starts (no 60 s wait for
    resources that never come), and nothing is left running."""
    cpus = len(os.sched_getaffinity(0))
    if cpus >= 4:
        pytest.skip(f"this machine has {cpus} CPUs: 4 workers fit")
    run = launch(sandbox, "ray", 4, suffix="too-many", timeout_s=FAIL_FAST_S + 30)
    assert run.returncode == 2, run.tail()
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "dist.workers=4" in errors[0] and "needs 4 CPUs" in errors[0]
    assert "Traceback" not in run.output, run.tail()
    assert "Started a local Ray instance" not in run.output, run.tail()
    assert "RayTrainWorker" not in run.output and "TrainController" not in run.output
    assert run.leftovers == [], f"processes outlived the driver: {run.leftovers}"
