"""Every launcher runs the one training loop, and bad input fails fast with one line.

`python -m fne_dist.train` on the tiny config (threads pinned to 1, batch 8, 0.05 epochs) is run
for real under Ray Train, torchrun, the deepspeed launcher, accelerate and srun-style Slurm
variables (no Slurm daemon: the variables srun would set), at world size 2 and 1. Each launcher
runs once per world size in a module-scoped fixture; the tests share those runs.

Isolation: every run gets its own directory (cwd, output, cache) and a free loopback port;
launcher variables inherited from whatever started pytest are dropped; Ray gets a short private
RAY_TMPDIR (so `ray.init()` starts its own local instance and never attaches to another cluster
on the machine) with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (every Ray port on loopback); gloo uses
the loopback interface. Every child carries a marker variable: after each run the test waits for
all marked processes to exit and kills stragglers by PID. DeepSpeed's JIT-compiled comm op is
cached in one directory shared by all runs (and test sessions), always built with the venv's
ninja (see `_sandbox_env`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fne_dist.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
ACCELERATE_CONFIG = ROOT / "cluster" / "accelerate" / "multi_node.yaml"
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 240.0  # one launcher run (each takes ~10-60 s on 2 busy cores)
FAIL_FAST_S = 60.0  # a bad-input error must come well before any training could finish
MARKER = "FNE_LAUNCHER_TEST"

pytestmark = pytest.mark.system


# ---------------------------------------------------------------------------------------------
# running launchers


@dataclass
class Run:
    name: str
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float
    run_dir: Path
    leftovers: list[int] = field(default_factory=list)  # marked PIDs still alive after the run

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def tail(self, n: int = 4000) -> str:
        return f"[{self.name}: rc={self.returncode}, {self.seconds:.1f} s]\n{self.output[-n:]}"

    def metrics(self) -> dict[str, Any]:
        path = self.run_dir / "metrics.json"
        assert self.returncode == 0 and path.is_file(), self.tail()
        return json.loads(path.read_text())


@dataclass
class Sandbox:
    env: dict[str, str]
    base: Path
    ray_tmp: Path
    marker: str
    timings: dict[str, float] = field(default_factory=dict)


def _is_launcher_var(key: str) -> bool:
    """Variables through which some launcher (or a Ray cluster) could reach our runs."""
    return key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES",
    ) or key.startswith(("SLURM_", "PMI_", "OMPI_", "TORCHELASTIC_", "ACCELERATE_", "RAY_"))


def _sandbox_env(ray_tmp: Path, marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _is_launcher_var(k)}
    # DeepSpeed JIT-compiles its shared-memory comm op with whichever `ninja` is first on PATH;
    # the venv's ninja and the system's hash build commands differently, so a cache shared with
    # runs that use the other one is rebuilt (~35 s) on every switch. Put the venv first and
    # keep a cache of our own, shared by every run of every session.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path(tempfile.gettempdir()) / "fne_dist-torch-extensions"
    )
    env.update(
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=extensions,
        HF_HUB_OFFLINE="1",
        RAY_TMPDIR=str(ray_tmp),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        **{MARKER: marker},
    )
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries this session's marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(proc.name))
    return pids


def _reap(marker: str, grace_s: float = 20.0) -> list[int]:
    """Wait for every marked process to exit; kill the ones still alive after ``grace_s``
    (all were started by this module) and return their PIDs."""
    deadline = time.monotonic() + grace_s
    while (alive := _marked_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


def run_launcher(
    sandbox: Sandbox,
    name: str,
    commands: list[list[str]],
    extra_env: list[dict[str, str]] | None = None,
    timeout_s: float = RUN_TIMEOUT_S,
) -> Run:
    """Start ``commands`` (one per process; srun-style runs have several) in a fresh directory,
    wait for all of them, kill all (by process group) at the timeout or as soon as one fails,
    then reap anything they left behind."""
    work = sandbox.base / name
    work.mkdir(parents=True)
    extra_env = extra_env or [{}] * len(commands)
    procs, files = [], []
    start = time.monotonic()
    try:
        for i, (cmd, extra) in enumerate(zip(commands, extra_env, strict=True)):
            out = (work / f"stdout{i}.txt").open("w")
            err = (work / f"stderr{i}.txt").open("w")
            files += [out, err]
            procs.append(
                subprocess.Popen(
                    [str(c).replace("{work}", str(work)) for c in cmd],
                    cwd=work,
                    env={**sandbox.env, **extra},
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # its own process group: killable as a whole
                )
            )
        deadline = start + timeout_s
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for f in files:
            f.close()
    seconds = time.monotonic() - start
    timed_out = seconds > timeout_s
    codes = [p.returncode for p in procs]
    returncode = None if timed_out else next((c for c in codes if c != 0), 0)
    stdout = "".join((work / f"stdout{i}.txt").read_text() for i in range(len(procs)))
    stderr = "".join((work / f"stderr{i}.txt").read_text() for i in range(len(procs)))
    leftovers = _reap(sandbox.marker)
    sandbox.timings[name] = seconds
    return Run(name, returncode, stdout, stderr, seconds, work / "out" / "tiny", leftovers)


def train_args(workers: int, *extra: str) -> list[str]:
    """`python -m fne_dist.train` arguments: the tiny config, made smaller and pinned."""
    return [
        "-m",
        "fne_dist.train",
        "--config",
        str(TINY),
        "run.output_dir={work}/out",
        "data.cache_dir={work}/cache",
        "run.threads=1",
        f"dist.workers={workers}",
        "train.batch_size=8",
        "train.epochs=0.05",  # 10 steps at world size 2 (3 warm-up), 19 at world size 1
        "dist.worker_start_timeout_s=30",
        "dist.collective_timeout_s=60",
        *extra,
    ]


def launch(sandbox: Sandbox, launcher: str, world: int, *extra: str, **kw: Any) -> Run:
    """One run of the tiny config through ``launcher`` with ``world`` ranks."""
    py, port = sys.executable, str(free_port())
    name = f"{launcher}-w{world}" + ("-" + kw.pop("suffix") if "suffix" in kw else "")
    if launcher in ("local", "ray"):
        forced = ["dist.launcher=ray"] if launcher == "ray" and world == 1 else []
        return run_launcher(sandbox, name, [[py, *train_args(world, *forced, *extra)]], **kw)
    if launcher == "torchrun":
        cmd = [BIN / "torchrun", "--nproc_per_node", world, "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", port, *train_args(world, *extra)]
        return run_launcher(sandbox, name, [cmd], **kw)
    if launcher == "deepspeed":
        cmd = [BIN / "deepspeed", "--num_gpus", world, "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", port, "--module", *train_args(world, *extra)[1:]]
        return run_launcher(sandbox, name, [cmd], **kw)
    if launcher == "accelerate":
        # `--cpu --num_processes 2` starts ONE process (accelerate's simple launcher; several
        # CPU processes need mpirun): two ranks on the CPU come from the torchrun-based
        # multi-GPU launcher, which runs fine without a GPU; at world size 2 through the
        # cluster's own config file (cluster/accelerate/multi_node.yaml), as users start it.
        cmd = [BIN / "accelerate", "launch"]
        if world == 1:
            cmd += ["--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
        else:
            cmd += ["--config_file", ACCELERATE_CONFIG, "--machine_rank", "0"]
        cmd += ["--num_machines", "1", "--num_processes", world]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        cmd += train_args(world, *extra)
        env = {"HF_HOME": str(sandbox.base / "hf")}  # no user default_config.yaml
        return run_launcher(sandbox, name, [cmd], [env], **kw)
    if launcher == "srun":  # the variables srun sets for `srun --ntasks W` on one node
        envs = [
            {
                "SLURM_PROCID": str(r),
                "SLURM_NTASKS": str(world),
                "SLURM_STEP_NUM_TASKS": str(world),  # an srun step, not the sbatch shell
                "SLURM_LOCALID": str(r),
                "SLURM_NODEID": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            for r in range(world)
        ]
        cmds = [[py, *train_args(world, *extra)] for _ in range(world)]
        return run_launcher(sandbox, name, cmds, envs, **kw)
    raise ValueError(launcher)


def final_loss(metrics: dict[str, Any]) -> float:
    return metrics["diagnostics"]["loss"]


def logged_losses(metrics: dict[str, Any]) -> list[float]:
    return [h["loss"] for h in metrics["history"] if "loss" in h]


def assert_same_results(runs: dict[str, Run], reference: str) -> None:
    """Test metrics, the final logged loss and every logged loss equal the reference run's."""
    ref = runs[reference].metrics()
    for name, run in runs.items():
        got = run.metrics()
        assert got["test"] == ref["test"], (name, got["test"], reference, ref["test"])
        assert final_loss(got) == final_loss(ref), (name, final_loss(got), final_loss(ref))
        assert logged_losses(got) == logged_losses(ref), (name, reference)
        assert got["steps"] == ref["steps"], (name, got["steps"], ref["steps"])


# ---------------------------------------------------------------------------------------------
# fixtures: one sandbox, and each launcher run once per world size


@pytest.fixture(scope="module")
def sandbox(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Sandbox]:
    # Short: Ray's socket paths under RAY_TMPDIR must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fnr", dir="/tmp"))
    marker = uuid.uuid4().hex
    box = Sandbox(_sandbox_env(ray_tmp, marker), tmp_path_factory.mktemp("launch"), ray_tmp, marker)
    t0 = time.monotonic()
    yield box
    _reap(marker, grace_s=5.0)
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
