"""Every cluster/slurm/*.sbatch script runs as written against a real single-node Slurm.

`sbatch --wait` of each script (one session-wide Slurm: tests/fixtures_slurm.py) with the tiny
config and 2 ranks on the CPU. What differs from a real cluster is given the way a user would
give it: sbatch options on the command line (1 node, no GPUs, a time limit) and the scripts'
FNE_* variables (config, overrides, interpreter, ports). Nothing exports MASTER_ADDR/PORT:
the srun script's tasks derive the rendezvous from Slurm's variables, the others from
`scontrol`. Each run leaves a run directory whose newest checkpoint validates.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fne_dist.checkpoint.validation import find_resumable, validate
from fne_dist.distributed.launch import free_port
from tests.fixtures_prometheus import TargetWatch, every_family, recorded, target_lines
from tests.fixtures_slurm import SlurmCluster
from tests.launch_helpers import is_launcher_var

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300  # sbatch --wait of one tiny run (30-90 s on 2 busy cores)
# The jobs' time limit: the scripts ask Slurm for USR1 300 s before it (up to 60 s earlier,
# Slurm's resolution), which would pre-empt a job under a shorter limit; 15 minutes keeps that
# signal past JOB_TIMEOUT_S, so only the pre-emption test sends one.
TIME_LIMIT = "--time=15"
TIMINGS: dict[str, float] = {}

pytestmark = [pytest.mark.system, pytest.mark.slow]


def job_env(cluster: SlurmCluster, work: Path, engine: str, **extra: str) -> dict[str, str]:
    """The submitting shell: our Slurm, the venv first on PATH, the tiny config through the
    scripts' FNE_* variables, gloo on loopback, DeepSpeed on the CPU with the shared
    extension cache (see tests/test_launchers.py), and no launcher variables at all.

    ``engine``: the launch path is what these tests check, so only the deepspeed script runs
    the DeepSpeed engine (its JIT-built comm op costs ~40 s cold); the others run the DDP twin.
    """
    env = {k: v for k, v in os.environ.items() if not is_launcher_var(k)}
    # ray.sbatch sets the output paths itself, from FNE_SHARED
    paths = (
        []
        if "FNE_SHARED" in extra
        else [f"run.output_dir={work}/out", f"data.cache_dir={work}/cache"]
    )
    args = [
        *paths,
        "run.threads=1",
        "train.batch_size=8",
        "train.epochs=0.02",  # 4 steps at world size 2 (3 warm-up): launch paths, not training
        "dist.rendezvous_timeout_s=120",
        "dist.collective_timeout_s=120",
        "dist.worker_start_timeout_s=60",
        f"engine.kind={engine}",
        *extra.pop("FNE_ARGS", "").split(),  # a test's own overrides come last
    ]
    env.update(
        cluster.env,
        PATH=os.pathsep.join([str(BIN), env.get("PATH", ""), "/usr/sbin"]),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR")
        or str(Path(tempfile.gettempdir()) / "fne_dist-torch-extensions"),
        HF_HUB_OFFLINE="1",
        GLOO_SOCKET_IFNAME="lo",
        FNE_PYTHON=sys.executable,
        FNE_CONFIG="tests/configs/tiny.yaml",
        FNE_ARGS=" ".join(args),
        # the scripts' Prometheus discovery files: here, not in the checkout's targets/
        FNE_PROM_TARGETS=extra.pop("FNE_PROM_TARGETS", str(work / "targets")),
        **extra,
    )
    return env


@dataclass
class Job:
    name: str
    returncode: int | None
    output: str
    seconds: float
    run_dir: Path

    def tail(self, n: int = 5000) -> str:
        return f"[{self.name}: rc={self.returncode}, {self.seconds:.1f} s]\n{self.output[-n:]}"


@dataclass
class Pending:
    """A submitted `sbatch --wait` (its Popen); ``wait`` gives the finished Job."""

    name: str
    proc: subprocess.Popen
    env: dict[str, str]
    out: Path
    run_dir: Path
    start: float
    timeout_s: float
    done: Job | None = None

    def wait(self) -> Job:
        """The job's result (the same for every caller); at the timeout (from submission) the
        job is cancelled (scancel by its id) and its return code is None."""
        if self.done is not None:
            return self.done
        left = max(1.0, self.start + self.timeout_s - time.monotonic())
        try:
            submitted, _ = self.proc.communicate(timeout=left)
            returncode: int | None = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            submitted, _ = self.proc.communicate()
            returncode = None
            submitted += _cancel(submitted.strip().split(";")[0], self.env)
        seconds = time.monotonic() - self.start
        TIMINGS[self.name] = seconds
        log = self.out.read_text(errors="replace") if self.out.is_file() else "(no job output)"
        self.done = Job(self.name, returncode, f"{submitted}\n{log}", seconds, self.run_dir)
        return self.done


def _cancel(job_id: str, env: dict[str, str]) -> str:
    """scancel a timed-out job by its id; returns what scontrol said of it."""
    if not job_id.isdigit():
        return "\n(timed out before sbatch printed a job id)"
    state = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    ).stdout  # fmt: skip
    subprocess.run(["scancel", job_id], env=env, timeout=30, check=False)
    return f"\n(timed out; scontrol show job:)\n{state}"


def submit(
    cluster: SlurmCluster,
    work: Path,
    script: str,
    options: list[str],
    engine: str = "ddp",
    **extra: str,
) -> Pending:
    """Start `sbatch --wait` from the repository root (the scripts' submit dir) and return at
    once: several jobs can run side by side (``--oversubscribe`` in ``options``)."""
    work.mkdir(parents=True)
    out = work / "slurm.out"
    env = job_env(cluster, work, engine, **extra)
    cmd = ["sbatch", "--wait", "--parsable", f"--output={out}", TIME_LIMIT, *options]
    proc = subprocess.Popen(
        [*cmd, f"cluster/slurm/{script}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Pending(script, proc, env, out, work / "out" / "tiny", time.monotonic(), JOB_TIMEOUT_S)


def sbatch(
    cluster: SlurmCluster,
    work: Path,
    script: str,
    options: list[str],
    engine: str = "ddp",
    **extra: str,
) -> Job:
    """`sbatch --wait` from the repository root; the job's output file is read back."""
    return submit(cluster, work, script, options, engine, **extra).wait()


def assert_trained_two_ranks(job: Job) -> None:
    """Exit 0, world size 2 in the summary, and a newest checkpoint that validates."""
    assert job.returncode == 0, job.tail()
    assert "on 2 rank(s)" in job.output, job.tail()
    assert (job.run_dir / "metrics.json").is_file(), job.tail()
    path, meta = find_resumable("latest", job.run_dir / "checkpoints", print, None)
    assert validate(path) == meta
    assert meta["world_size"] == 2 and meta["step"] > 0, meta


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("slurm-jobs")
    yield base
    if TIMINGS:
        print("\nslurm jobs (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


RAY_RUN = "tinyray"  # run.name of the ray.sbatch job: its series' run label


def _ray_job(cluster: SlurmCluster, work: Path, targets: Path | None) -> tuple[Pending, Path, Path]:
    """Submit ray.sbatch: a Ray head inside the allocation on free ports, its own short temp
    dir (socket paths) and $HOME (where the generated token goes); (job, temp dir, home).
    ``targets``: the session Prometheus's discovery directory (None: no Prometheus), where the
    script copies its Ray head's discovery file; the workers stay up 12 s after training
    (monitor.linger_s) so that Ray's agent exports their final values."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsr", dir="/tmp"))
    home = work / "ray-home"
    home.mkdir(parents=True)
    shared = work / "ray"
    ports = ("ray-client-server-port", "metrics-export-port", "dashboard-agent-grpc-port")
    ports += ("dashboard-agent-listen-port",)
    job = submit(
        cluster,
        shared,
        "ray.sbatch",
        ["--nodes=1", "--gpus-per-task=0", "--cpus-per-task=2", "--oversubscribe"],
        FNE_WORKERS="2",
        FNE_SHARED=str(shared / "shared"),
        FNE_RAY_PORT=str(free_port()),
        FNE_RAY_DASHBOARD_PORT=str(free_port()),
        FNE_RAY_TMP=str(ray_tmp),
        FNE_RAY_START_ARGS=" ".join(f"--{opt}={free_port()}" for opt in ports),
        HOME=str(home),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # run.id: the Ray launcher labels the series with it (a generated one otherwise)
        FNE_ARGS=f"run.name={RAY_RUN} run.id={RAY_RUN} monitor.linger_s=12",
        **({"FNE_PROM_TARGETS": str(targets)} if targets else {}),
    )
    job.run_dir = shared / "shared" / "runs" / RAY_RUN
    return job, ray_tmp, home


@dataclass
class Requeueable:
    """A job submitted with --requeue (no --wait): its id, environment, output and run dir."""

    job_id: str
    env: dict[str, str]
    out: Path
    run_dir: Path
    start: float


def _submit_requeueable(cluster: SlurmCluster, work: Path) -> Requeueable:
    """srun.sbatch as an admin submits it: the config and one override as arguments (no
    FNE_CONFIG), a site hook (FNE_ENV_SETUP) that names the interpreter (no FNE_PYTHON), the
    script's own --requeue, --open-mode=append and --signal; ~20 steps at world size 2
    (checkpoint every 2 steps), sharing the node with the other jobs (--oversubscribe)."""
    job_dir = work / "requeue"
    job_dir.mkdir(parents=True)
    out = job_dir / "slurm.out"
    env = job_env(cluster, job_dir, "ddp")
    del env["FNE_CONFIG"], env["FNE_PYTHON"]
    hook = job_dir / "site.sh"
    hook.write_text(f'echo "site hook: FNE_PYTHON={sys.executable}"\nFNE_PYTHON={sys.executable}\n')
    env["FNE_ENV_SETUP"] = str(hook)
    env["FNE_ARGS"] += (
        " train.epochs=0.1 checkpoint.every_steps=2 checkpoint.keep_last=0"
        " checkpoint.stop_grace_s=4"
    )
    options = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-task=0", "--cpus-per-task=1"]
    start = time.monotonic()
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={out}", TIME_LIMIT, *options, "--oversubscribe",
         "cluster/slurm/srun.sbatch", "tests/configs/tiny.yaml", "train.log_every=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    return Requeueable(job_id, env, out, job_dir / "out" / "tiny", start)


@pytest.fixture(scope="module")
def launched(
    slurm_cluster: SlurmCluster, work: Path, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """Every cluster/slurm script submitted at once (``--oversubscribe``: they share the
    node's 2 cores), so that their start-ups overlap, the pre-emption test's job first (its
    waits, for the requeue and Slurm's KillWait, overlap the others' runs); each test waits
    for its own job. The session's Prometheus (where installed) runs before the Ray job, which
    puts its discovery file where that server looks. Jobs still running at teardown are
    cancelled by id."""
    prom = None
    with contextlib.suppress(pytest.skip.Exception):
        prom = request.getfixturevalue("prometheus")
    opts = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--oversubscribe"]
    jobs: dict[str, Any] = {
        "requeue": _submit_requeueable(slurm_cluster, work),
        "srun": submit(
            slurm_cluster,
            work / "srun",
            "srun.sbatch",
            [
                "--nodes=1",
                "--ntasks-per-node=2",
                "--gpus-per-task=0",
                "--cpus-per-task=1",
                opts[-1],
            ],
        ),
        "torchrun": submit(
            slurm_cluster, work / "torchrun", "torchrun.sbatch", opts, FNE_NPROC_PER_NODE="2"
        ),
        "deepspeed": submit(
            slurm_cluster,
            work / "deepspeed",
            "deepspeed.sbatch",
            opts,
            engine="deepspeed",
            FNE_NPROC_PER_NODE="2",
        ),
    }
    targets = prom.targets if prom else None
    jobs["ray"], jobs["ray_tmp"], jobs["ray_home"] = _ray_job(slurm_cluster, work, targets)
    jobs["prometheus"] = prom
    if prom is not None:
        job, folder = jobs["ray"], str(prom.targets / "ray")
        jobs["ray_targets"] = TargetWatch(
            prom,
            "ray",
            lambda t: t["discoveredLabels"].get("__meta_filepath", "").startswith(folder),
            1,
            lambda: job.proc.poll() is None,
        )
    try:
        yield jobs
    finally:
        for name in ("srun", "torchrun", "deepspeed", "ray"):
            if jobs[name].proc.poll() is None:
                jobs[name].timeout_s = 0.0  # cancels the job by its id
                jobs[name].wait()
        req = jobs["requeue"]
        subprocess.run(["scancel", req.job_id], env=req.env, timeout=30, check=False)
        shutil.rmtree(jobs["ray_tmp"], ignore_errors=True)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _job_state(cluster: SlurmCluster, env: dict[str, str], job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict ({} once Slurm has forgotten the job)."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    ).stdout  # fmt: skip
    return dict(f.split("=", 1) for f in shown.split() if "=" in f)


# Why a requeued job may not start at once: the requeue revokes the job's credential on the
# node at that second (slurmd keeps the revoke time in whole seconds), and slurmd refuses a
# batch launch whose credential was created in that same second or earlier ("Job N already
# killed, do not launch batch job": the job ends FAILED). Slurm itself waits the credential
# lifetime (120 s) through the begin time it sets; the test makes the job eligible once the
# clock has moved past the second of the revoke, which came before the job was seen pending.
REQUEUE_RELEASE_S = 2.0


def _wait_job(cluster, env, job_id: str, done, timeout_s: float) -> dict[str, str]:
    """Poll the job until ``done(state)``; a requeued job held back by Slurm's begin-time
    delay is made eligible REQUEUE_RELEASE_S after it was first seen so (only the wait is
    shortened, not the requeue)."""
    deadline = time.monotonic() + timeout_s
    held_since: float | None = None
    while time.monotonic() < deadline:
        state = _job_state(cluster, env, job_id)
        if done(state):
            return state
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
            held_since = held_since or time.time()
            if time.time() >= held_since + REQUEUE_RELEASE_S:
                print(f"job {job_id}: requeued with a begin time, made eligible now")
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env,
                    capture_output=True, timeout=30, check=False,
                )  # fmt: skip
                held_since = None
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done after {timeout_s} s: {state}")


PREEMPT_LINES = (
    "site hook:",
    "pre-emption:",
    "interrupted:",
    "checkpoint",
    "requeued job",
    "resumed from",
)


@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, launched: dict
) -> None:
    """Invariant (pre-emption): srun.sbatch, given the USR1 its ``--signal=B:USR1@300`` asks
    Slurm to send before the time limit (sent here at once with ``scancel --signal=USR1
    --batch``, as Slurm does), stops its ranks (SIGTERM: a last checkpoint if one is due,
    exit 75, one line, no traceback), requeues itself under the same job id, and the requeued
    job resumes from exactly the step the first attempt stopped at and finishes:
    train_log.jsonl holds every step once, 1..N in order, and the first attempt's output is
    still in the log (--open-mode=append). The site hook ran before the launch (it alone names
    the interpreter) and the config came as the script's argument."""
    job: Requeueable = launched["requeue"]
    env, out, run_dir, job_id = job.env, job.out, job.run_dir, job.job_id
    log = run_dir / "train_log.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S / 2
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, out.read_text() if out.is_file() else "no output"
        state = _job_state(slurm_cluster, env, job_id).get("JobState")
        assert state not in ENDED, (state, out.read_text() if out.is_file() else "")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, timeout=30, check=True)
    signalled_at = time.monotonic() - job.start
    final = _wait_job(
        slurm_cluster, env, job_id,
        lambda s: s.get("JobState") in ENDED,
        JOB_TIMEOUT_S - (time.monotonic() - job.start) - 10,
    )  # fmt: skip
    TIMINGS["preempt"] = time.monotonic() - job.start
    output = out.read_text(errors="replace")
    shown = [ln for ln in output.splitlines() if ln.lstrip().startswith(PREEMPT_LINES)]
    print(f"\npre-emption test: USR1 after {signalled_at:.1f} s, done after "
          f"{TIMINGS['preempt']:.1f} s\n" + "\n".join(shown))  # fmt: skip
    assert final.get("JobState") == "COMPLETED" and final.get("Restarts") == "1", (
        final,
        output[-5000:],
        slurm_cluster.log("slurmd"),
        slurm_cluster.log("slurmctld"),
    )
    assert output.count("site hook: FNE_PYTHON=") == 2, output[-5000:]  # both attempts
    assert "config tests/configs/tiny.yaml" in output, output[-5000:]
    assert "pre-emption: USR1 received" in output, output[-5000:]
    # srun's own status varies (--kill-on-bad-exit ends the slower rank once one exited 75)
    assert "pre-emption: training step ended (exit " in output, output[-5000:]
    assert "interrupted: SIGTERM" in output and "Traceback" not in output, output[-5000:]
    assert f"requeued job {job_id} (restart 1)" in output
    stopped = next(ln for ln in output.splitlines() if "interrupted: SIGTERM" in ln)
    resumed = next(ln for ln in output.splitlines() if "resumed from" in ln)
    at = int(resumed.split("optimizer step ")[1].split(",")[0])
    # resumed at the step it stopped at: the stop wrote it, or it was already the newest
    wrote, had = f"wrote checkpoint step {at};", f"none due; step {at} stays the newest"
    assert wrote in stopped or had in stopped, (at, stopped)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert steps == list(range(1, metrics["steps"] + 1)), steps
    _, meta = find_resumable("latest", run_dir / "checkpoints", print, None)
    assert meta["step"] == metrics["steps"] and meta["world_size"] == 2


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_srun_script_derives_the_rendezvous(launched: dict[str, Any]) -> None:
    """Invariant: cluster/slurm/srun.sbatch with 2 tasks, and no MASTER_* anywhere in the
    submitting environment, trains 2 ranks that found each other through Slurm's variables
    (first host of the step's node list at its NodeAddr, a port from the job id)."""
    job = launched["srun"].wait()
    assert_trained_two_ranks(job)
    assert "rank 0/2 on cpu" in job.output, job.tail()


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_torchrun_script(launched: dict[str, Any]) -> None:
    """Invariant: cluster/slurm/torchrun.sbatch (one srun task per node running torchrun with
    a c10d rendezvous on the first node) trains 2 ranks."""
    job = launched["torchrun"].wait()
    assert_trained_two_ranks(job)
    assert "rendezvous 127.0.0.1:" in job.output, job.tail()  # the node's NodeAddr


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_deepspeed_script(slurm_cluster: SlurmCluster, launched: dict[str, Any]) -> None:
    """Invariant: cluster/slurm/deepspeed.sbatch (a hostfile from the allocation, the deepspeed
    launcher with --no_ssh on each node, the script entry) trains 2 ranks without ssh."""
    job = launched["deepspeed"].wait()
    assert_trained_two_ranks(job)
    assert f"{slurm_cluster.node} slots=2" in job.output, job.tail()


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_ray_script(launched: dict[str, Any]) -> None:
    """Invariant: cluster/slurm/ray.sbatch starts a Ray head inside the allocation (token
    authentication, non-default ports), submits the training as a Ray job with 2 Ray Train
    workers, writes to the absolute shared path it was given, and tears Ray down: the job
    exits 0 and no Ray process of its temp dir survives."""
    job = launched["ray"].wait()
    ray_tmp = launched["ray_tmp"]
    leftovers = subprocess.run(
        ["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert (launched["ray_home"] / ".ray" / "auth_token").is_file(), job.tail()
    assert_trained_two_ranks(job)
    assert "outputs: run.output_dir=" in job.output, job.tail()
    assert leftovers == [], f"Ray processes outlived the job: {leftovers}"


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_ray_script_is_scraped_by_the_shipped_prometheus_config(launched: dict) -> None:
    """Invariant: cluster/slurm/ray.sbatch puts its Ray head's discovery file (in the job's
    own temp dir) where the shipped prometheus.yml's "ray" job looks (targets/ray/, here the
    session server's templated copy), so a real Prometheus started from that config scrapes
    the node's metrics agent (up) while the job runs and receives every fne_* family from
    both Ray Train workers (recorded from ray_fne_* under the fne_* names), gauges still NaN
    included (Ray's agent drops NaN: the Ray sink sends a stand-in the rules turn back); the
    file is gone after the job."""
    prom = launched["prometheus"]
    if prom is None:
        pytest.skip("prometheus (Debian package) not installed")
    targets = launched["ray_targets"].seen()
    done = launched["ray"].wait()
    print("\nray.sbatch job, Prometheus /api/v1/targets (job=ray):")
    print("\n".join(target_lines(targets)))
    assert targets and all(t["health"] == "up" for t in targets), (targets, done.tail())
    assert_trained_two_ranks(done)
    lines = every_family(prom, f'job="ray", run="{RAY_RUN}"', {"0", "1"})
    print("\n".join(lines))
    # fne_temperature is NaN on every rank (the tiny config's hinge loss has no temperature)
    nan = prom.poll(recorded(f'fne_temperature{{job="ray", run="{RAY_RUN}"}}'), want=2)
    assert all(s["value"][1] == "NaN" for s in nan), nan
    assert list((prom.targets / "ray").glob("*.json")) == []
