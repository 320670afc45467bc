"""cluster/ray: the cluster launcher config passes Ray's own validator, and `ray job submit`
works against a real two-node Ray cluster with token authentication.

The head (one per module) runs on loopback (127.0.0.3) on non-default ports with its own
--temp-dir and $HOME (where `ray get-auth-token --generate` writes the token); a second node
joins at 127.0.0.2. Every process they start carries a marker variable and is stopped by PID at
the end, never with `ray stop` (which would stop other Ray users of the machine). The jobs on
this one cluster cover: a worker killed with SIGKILL and Ray's restart from the latest
checkpoint, `ray job stop` then a resubmission with checkpoint.resume=latest, a resubmission
that must not resume, relative paths refused, a worker's data error failing its job, and the
resumed job's metrics reaching the session's Prometheus through Ray's agents (the head's
--temp-dir is where Prometheus finds them).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fne_dist.checkpoint.validation import find_resumable, list_checkpoints, validate
from fne_dist.distributed.launch import free_port
from tests.fixtures_prometheus import Prometheus, recorded
from tests.launch_helpers import global_batches

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTER_YAML = ROOT / "cluster" / "ray" / "cluster.yaml"
RUNTIME_ENV = ROOT / "cluster" / "ray" / "runtime_env.yaml"
PROM_RULES = ROOT / "cluster" / "prometheus" / "rules"
VAL_SHARD = ROOT / "shards" / "emoji" / "emoji-val-000000.tar.gz"
MARKER = "FNE_RAY_HEAD_TEST"
JOB_TIMEOUT_S = 300
HEAD_IP = "127.0.0.3"  # the head node's address (loopback); a second node joins at 127.0.0.2


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validator() -> None:
    """Invariant: cluster/ray/cluster.yaml, filled out with the provider's defaults as `ray up`
    does, passes Ray's own schema validation (offline) with a head and a GPU worker type; the
    same file with a misspelt key or a head type that does not exist is refused (the check
    can fail)."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    prepared = _prepared(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any("/shared" in cmd for cmd in prepared["setup_commands"])
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 4}
    with pytest.raises(Exception, match="resourcez"):
        _prepared(bad)
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(bad)


def test_runtime_env_is_accepted_by_ray() -> None:
    """Invariant: cluster/ray/runtime_env.yaml is a valid Ray runtime environment."""
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load(RUNTIME_ENV.read_text())
    env = RuntimeEnv(**data)
    assert ".venv" in env["excludes"] and env["env_vars"]["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------------------------------------
# a real head with token authentication


@dataclass
class RayHead:
    env: dict[str, str]
    address: str
    temp: Path
    marker: str
    base: Path
    gcs: str  # the head's GCS address, for `ray start --address` of another node

    def submit(self, name: str, *args: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[int, str]:
        """`ray job submit` (waits for the job; returns its exit status and logs)."""
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={self.address}"]
        cmd += [f"--submission-id={name}-{uuid.uuid4().hex[:6]}", "--working-dir=."]
        cmd += [f"--runtime-env={RUNTIME_ENV}", "--", sys.executable, "-m", "fne_dist.train"]
        out = subprocess.run(
            [*cmd, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return out.returncode, out.stdout + out.stderr

    def ray(self, *args: str, timeout_s: float = 120) -> str:
        """A `ray` CLI command against this head (its output; fails the test on an error)."""
        done = subprocess.run(
            [str(BIN / "ray"), *args, f"--address={self.address}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def start(self, name: str, *args: str) -> str:
        """`ray job submit --no-wait`; returns the submission id."""
        job = f"{name}-{uuid.uuid4().hex[:6]}"
        cmd = ["job", "submit", "--no-wait", f"--submission-id={job}", "--working-dir=."]
        cmd += [f"--runtime-env={RUNTIME_ENV}", "--", sys.executable, "-m", "fne_dist.train"]
        done = subprocess.run(
            [str(BIN / "ray"), *cmd[:2], f"--address={self.address}", *cmd[2:], *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return job

    def jobs_api(self, path: str) -> dict:
        """GET from the head's Jobs REST API, with the token as a bearer header (cheaper than
        a `ray` CLI process per poll)."""
        token = (Path(self.env["HOME"]) / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(
            f"{self.address}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def ended(self, job: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str]:
        """Wait for a `--no-wait` job's end (polled every 0.5 s); (status, logs)."""
        deadline = time.monotonic() + timeout_s
        while (status := self.jobs_api(job)["status"]) in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, f"job {job} still {status} after {timeout_s} s"
            time.sleep(0.5)
        return status, self.jobs_api(f"{job}/logs")["logs"]


def _marked(marker: str) -> list[int]:
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
    return pids


def _stop(marker: str) -> None:
    """SIGTERM, then SIGKILL after 3 s, to every process the head started (by PID)."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in _marked(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.3)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory, ray_temp_root: Path) -> Iterator[RayHead]:
    base = tmp_path_factory.mktemp("ray-head")
    temp = ray_temp_root / "ray"  # short (socket paths); the session's Prometheus watches it
    temp.mkdir()
    marker = uuid.uuid4().hex
    home = base / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "SLURM_", "MASTER_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(
        HOME=str(home),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        PYTHONPATH=str(ROOT),
        RAY_AUTH_MODE="token",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_metrics_report_interval_ms="1000",  # workers' metrics reach the agent every second
        # Ray Train's pre-emption watcher only logs node drains (an autoscaler's or `ray
        # drain-node`'s): none here, and it is one more actor process at every worker group
        # start (six starts in this module) on 2 busy cores. Read by the controller, which
        # inherits the raylet's environment.
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        # How often the Train controller polls its workers (Ray's default 2 s): a finished or
        # failed worker group is seen up to 2 s later, once per job end and once per failure
        # (a lost node, a killed worker). A poll is one small actor call per worker.
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
        GLOO_SOCKET_IFNAME="lo",
        DS_ACCELERATOR="cpu",
        **{MARKER: marker},
    )
    ray = str(BIN / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True,
                   check=True, timeout=60)  # fmt: skip
    gcs, dash, client, metrics, agent_grpc, agent_http = (free_port() for _ in range(6))
    # The head's node address is 127.0.0.3, not 127.0.0.1: a node joining at 127.0.0.1 would
    # have Ray rewrite that to the machine's routable address, where the GCS does not listen.
    cmd = [ray, "start", "--head", "--num-cpus=2", f"--node-ip-address={HEAD_IP}",
           f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
           f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--dashboard-agent-listen-port={agent_http}",
           f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield RayHead(env, f"http://127.0.0.1:{dash}", temp, marker, base, f"{HEAD_IP}:{gcs}")
    finally:
        _stop(marker)
        shutil.rmtree(temp, ignore_errors=True)


def _tiny(head: RayHead, name: str, *extra: str) -> list[str]:
    out = head.base / "shared"
    return [
        "--config",
        "tests/configs/tiny.yaml",
        f"run.name={name}",
        f"run.output_dir={out}/runs",
        f"data.cache_dir={out}/cache",
        "run.threads=1",
        "dist.workers=2",
        "train.batch_size=8",
        "train.epochs=0.02",  # 4 steps at world size 2 (3 warm-up): launch paths, not training
        "engine.kind=ddp",
        "dist.cpus_per_worker=2",  # a whole node's CPUs: one worker per node of two
        "dist.worker_start_timeout_s=60",
        "dist.collective_timeout_s=120",
        *extra,
    ]


def _until(ready, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(ready())


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines]


class JobLogClock:
    """Reads a job's log every 0.5 s in a thread and notes when each line first appeared (s
    since ``t0``): Ray's lines carry no time of their own, and a CI log then shows where a
    job's time went (the start of a worker group, the detection of a lost node, a wait)."""

    def __init__(self, head: RayHead, job: str, t0: float) -> None:
        self.head, self.job, self.t0 = head, job, t0
        self.seen: list[tuple[float, str]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(Exception):  # a poll that fails: the next one catches up
                lines = self.head.jobs_api(f"{self.job}/logs")["logs"].splitlines()
                now = time.monotonic() - self.t0
                self.seen += [(now, ln) for ln in lines[len(self.seen) :]]
            self.done.wait(0.5)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def lines(self, keys: tuple[str, ...]) -> list[str]:
        return [f"{t:6.1f} {ln.strip()}" for t, ln in self.seen if any(k in ln for k in keys)]


@pytest.fixture(scope="module")
def second_node(ray_head: RayHead) -> Iterator[str]:
    """A second Ray node joining the head (`ray start --address` at 127.0.0.2, its own short
    temp dir and ports, the same token), stopped by PID (its own marker) at the end."""
    temp = Path(tempfile.mkdtemp(prefix="fn2", dir="/tmp"))  # short: socket paths
    marker = uuid.uuid4().hex
    ports = [f"--{opt}={free_port()}" for opt in (
        "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "runtime-env-agent-port",
    )]  # fmt: skip
    cmd = [str(BIN / "ray"), "start", f"--address={ray_head.gcs}", "--node-ip-address=127.0.0.2"]
    cmd += ["--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats", *ports]
    try:
        # A node joining a cluster: `ray start --address` refuses with this variable at 0 (it
        # means "one-node Ray"); the addresses stay on loopback through --node-ip-address.
        env = {**ray_head.env, MARKER: marker, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield marker
    finally:
        _stop(marker)
        shutil.rmtree(temp, ignore_errors=True)


STOP_ARGS = (
    "train.epochs=0.12",  # 22 steps: still running when `ray job stop` arrives
    "train.log_every=1",
    "checkpoint.every_steps=4",  # each costs seconds here (Ray copies it to its storage)
    "dist.max_failures=1",
)


def _complete_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (meta.json written last, after every rank's part)."""
    return [int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoints/step-*/meta.json")]


def _kill_a_worker(marker: str) -> int:
    """SIGKILL one Ray Train worker process of the node whose processes carry ``marker``."""
    for pid in _marked(marker):
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if title.startswith(b"ray::RayTrainWorker"):
                os.kill(pid, signal.SIGKILL)
                return pid
    raise AssertionError("no RayTrainWorker process on the second node")


@pytest.fixture(scope="module")
def stopped(ray_head: RayHead, second_node: str) -> dict:
    """A 2-worker job (one worker per node) whose worker on the second node is killed with
    SIGKILL after the first complete checkpoint (Ray restarts the worker group, dist.max_failures
    =1), then stopped with `ray job stop` once the restarted group has written a checkpoint of
    its own; the steps it logged, after its workers are gone."""
    run_dir = ray_head.base / "shared" / "runs" / "tiny"
    t0 = time.monotonic()
    job = ray_head.start("stopped", *_tiny(ray_head, "tiny", *STOP_ARGS))
    assert _until(lambda: _complete_steps(run_dir), JOB_TIMEOUT_S), ray_head.ray(
        "job", "logs", job
    )[-3000:]
    killed = _kill_a_worker(second_node)
    # A checkpoint needs every rank's part, so one newer than those complete now comes from
    # the restarted worker group.
    before_kill = max(_complete_steps(run_dir))
    restarted = _until(lambda: max(_complete_steps(run_dir)) > before_kill, JOB_TIMEOUT_S)
    assert restarted, ray_head.ray("job", "logs", job)[-3000:]
    ray_head.ray("job", "stop", job)
    status = ray_head.jobs_api(job)["status"]  # `ray job stop` waited for the stop
    seen: list[list[int]] = [[-1], _steps(run_dir)]  # settle: the workers die after the driver
    while seen[-1] != seen[-2]:
        time.sleep(2)
        seen.append(_steps(run_dir))
    logs = ray_head.jobs_api(f"{job}/logs")["logs"]
    return {
        "status": status,
        "steps": seen[-1],
        "logs": logs,
        "killed": killed,
        "before_kill": before_kill,
        "s": time.monotonic() - t0,
    }


@pytest.fixture(scope="module")
def refusals(ray_head: RayHead, stopped: dict) -> dict[str, str]:
    """Two submissions the driver must refuse before any worker starts, submitted (--no-wait)
    once the stopped run's checkpoints exist and before the resumed job, so that they run
    beside its start-up: the same run name without checkpoint.resume, and the default
    relative output paths. Their submission ids."""
    return {
        "again": ray_head.start("again", *_tiny(ray_head, "tiny")),
        "relative": ray_head.start(
            "relative", "--config", "tests/configs/tiny.yaml", "dist.workers=2"
        ),
    }


@pytest.fixture(scope="module")
def resumed(
    ray_head: RayHead, stopped: dict, refusals: dict[str, str], request: pytest.FixtureRequest
) -> dict:
    """The same run resubmitted with checkpoint.resume=latest, to its end. Its phases are
    timed and its run label is known, and the session's Prometheus (where installed) runs
    before it starts: its metrics are those test_ray_run_arrives_under_the_same_names reads."""
    with contextlib.suppress(pytest.skip.Exception):
        request.getfixturevalue("prometheus")
    run_id = f"resumed-{uuid.uuid4().hex[:8]}"  # the series' run label
    t0 = time.monotonic()
    # Only the end-of-run checkpoint: the stopped job's ones are what this job resumes from,
    # and each Ray checkpoint costs seconds here.
    args = [a for a in STOP_ARGS if not a.startswith("checkpoint.every_steps=")]
    args += ["checkpoint.resume=latest", f"run.id={run_id}", "train.profile_phases=true"]
    rc, out = ray_head.submit("resumed", *_tiny(ray_head, "tiny", *args))
    print(f"\nray jobs: stopped {stopped['s']:.1f} s, resumed {time.monotonic() - t0:.1f} s")
    return {
        "rc": rc,
        "out": out,
        "run": run_id,
        "run_dir": ray_head.base / "shared" / "runs" / "tiny",
    }


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_ray_job_stop_then_resume_continues(stopped: dict, resumed: dict) -> None:
    """Invariant: `ray job stop` of a running job after its first checkpoint, then a
    resubmission with checkpoint.resume=latest, resumes from a complete checkpoint (the
    "resumed from" line) and logs exactly the remaining steps: the step sequence in
    train_log.jsonl continues without a gap or a repeat past the resume point."""
    assert stopped["status"] == "STOPPED", stopped["status"]
    before = stopped["steps"]
    assert resumed["rc"] == 0, resumed["out"][-5000:]
    _, last = find_resumable("latest", resumed["run_dir"] / "checkpoints", print, None)
    total = last["step"]  # the end-of-training checkpoint: the run's last optimizer step
    assert before and before[-1] < total, before
    lines = [ln for ln in resumed["out"].splitlines() if "resumed from" in ln]
    assert lines, resumed["out"][-3000:]
    step = int(lines[0].split("optimizer step ")[1].split(",")[0])
    assert step >= 4 and step % 4 == 0, lines[0]
    assert step <= before[-1], (step, before)
    # the lines of steps the resumed run redid were dropped, so every step is there once
    assert _steps(resumed["run_dir"]) == list(range(1, total + 1))


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_ray_restarts_a_killed_worker_from_the_latest_checkpoint(stopped: dict) -> None:
    """Invariant: with dist.max_failures=1, SIGKILL of the Ray Train worker on the second node
    after a complete checkpoint makes Ray restart the worker group, which resumes from a
    complete checkpoint no newer than the last one before the kill (the log says from where)
    and goes on checkpointing; the job log shows the restart, not a failure."""
    lines = [ln for ln in stopped["logs"].splitlines() if "resumed from" in ln]
    assert lines, stopped["logs"][-5000:]
    step = int(lines[0].split("optimizer step ")[1].split(",")[0])
    assert 4 <= step <= stopped["before_kill"], (lines[0], stopped["before_kill"])
    assert stopped["status"] == "STOPPED", stopped["status"]
    print(f"\nkill -9 of Ray worker PID {stopped['killed']}; restart log: {lines[0].strip()}")


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_ray_job_submit_with_token_auth(
    ray_head: RayHead, resumed: dict, refusals: dict[str, str]
) -> None:
    """Invariant: with token authentication on, `ray job submit --working-dir .` of the tiny
    run (2 Ray Train workers) succeeds, prints where its outputs go, and leaves a valid
    checkpoint on the absolute storage path it was given; a submission with the same run name
    and no checkpoint.resume (made while the stopped run's checkpoints were there) fails at the
    driver with one line instead of silently resuming that run."""
    out, run_dir = resumed["out"], resumed["run_dir"]
    assert resumed["rc"] == 0, out[-5000:]
    assert f"outputs: run.output_dir={run_dir}" in out, out[-3000:]
    assert "on 2 rank(s)" in out, out[-3000:]
    path, meta = find_resumable("latest", run_dir / "checkpoints", print, None)
    assert meta["world_size"] == 2 and validate(path) == meta

    status, out = ray_head.ended(refusals["again"])
    assert status == "FAILED", status + out[-3000:]
    assert "run.name=tiny already holds a run" in out, out[-3000:]
    assert "resumed from" not in out and "RayTrainWorker" not in out


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_ray_job_on_two_nodes(stopped: dict, resumed: dict) -> None:
    """Invariant: with a second Ray node joined to the head, workers that each need a whole
    node's CPUs run one per node (Ray's worker list names both addresses) in both jobs, and
    every checkpoint lists both ranks' files."""
    for out in (stopped["logs"], resumed["out"]):
        assert "ip=127.0.0.2" in out and f"ip={HEAD_IP}" in out, out[-5000:]
    for step_dir in list_checkpoints(resumed["run_dir"] / "checkpoints"):
        files = validate(step_dir)["files"]
        assert {"rank-00000.json", "rank-00001.json", "rank-00001.safetensors"} <= set(files)


@pytest.mark.system
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_relative_paths_under_a_ray_job_are_refused(
    ray_head: RayHead, refusals: dict[str, str]
) -> None:
    """Invariant: a job submitted with the default relative run.output_dir/data.cache_dir
    fails before any worker starts, with one line saying to pass absolute paths (they would
    land in Ray's temporary copy of the working dir, which Ray deletes)."""
    status, out = ray_head.ended(refusals["relative"])
    assert status == "FAILED", status + out[-3000:]
    assert "error: under a Ray job the working dir is Ray's temporary copy" in out, out[-3000:]
    assert "run.output_dir=runs" in out and "RayTrainWorker" not in out


@pytest.mark.system
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_worker_error_fails_the_job(ray_head: RayHead, second_node: str) -> None:
    """Invariant: a truncated val shard passes the driver's preflight (the path exists, its
    size index promises every sample) and is only found when the Ray workers read it; with half
    its samples missing (above data.max_bad_fraction) the job then fails promptly with the
    worker's traceback (the DataError naming data.val, the shard and the reason) in its
    output, and no metrics.json."""
    corrupt = ray_head.base / "corrupt" / "emoji-val-000000.tar.gz"
    corrupt.parent.mkdir(parents=True)
    data = VAL_SHARD.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])  # a truncated gzip stream
    (corrupt.parent / "sizes.json").write_text(json.dumps({corrupt.name: 366}))
    rc, out = ray_head.submit("corrupt", *_tiny(ray_head, "corrupt", f"data.val={corrupt}"))
    assert rc != 0, out[-5000:]
    assert "Traceback" in out and "load_split" in out, out[-5000:]
    assert f"data.val: shard {corrupt}" in out and "truncated_tar" in out, out[-5000:]
    assert not (ray_head.base / "shared" / "runs" / "corrupt" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# metrics of a Ray job reach the session's Prometheus through Ray's own agent


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_ray_run_arrives_under_the_same_names(resumed: dict, prometheus: Prometheus) -> None:
    """Invariant: a 2-worker Ray Train job's metrics (the resumed job's) reach Prometheus
    through Ray's metrics agents and the head's discovery file (job="ray", no port of ours),
    recorded under the fne_* names for both ranks (one per node), and the per-run recording
    rules return data for it."""
    assert resumed["rc"] == 0, resumed["out"][-5000:]
    run = resumed["run"]
    info = prometheus.poll(recorded(f'fne_run_info{{job="ray", run="{run}"}}'), want=2)
    assert {s["metric"]["rank"] for s in info} == {"0", "1"}, info
    assert {s["metric"]["launcher"] for s in info} == {"ray"}
    lines = [f"Ray 2-worker job (resumed), run label {run}"]
    for name in ("fne_samples_total", "fne_loss", "fne_fn_share", "fne_phase_seconds_total"):
        result = prometheus.poll(recorded(f'{name}{{job="ray", run="{run}"}}'), want=2)
        assert {s["metric"]["rank"] for s in result} == {"0", "1"}, (name, result)
        lines.append(f"{name}: {len(result)} series")
    rules = yaml.safe_load((PROM_RULES / "fne_recording.yml").read_text())["groups"]
    for rule in (r for g in rules for r in g["rules"]):
        result = prometheus.poll(recorded(f'{rule["record"]}{{run="{run}"}}'), want=1)
        assert len(result) == 1, (rule["record"], result)
        lines.append(f"{rule['record']}: {result[0]['value'][1]}")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# last: it stops the second node, which the tests above need


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_a_ray_run_that_loses_its_second_node_goes_on_with_one_worker(
    ray_head: RayHead, second_node: str
) -> None:
    """Invariant: a 2-worker job (one worker per node) with dist.min_workers=1 and the global
    batch stated, whose second node is stopped after a complete checkpoint, is restarted by
    Ray's elastic policy with the one worker the head still has room for (its cluster view
    refreshed on the failure, which the controller's warning in the job log says:
    fne_dist.distributed.ray_elastic; should that view still count
    the lost node, the restart times out and the next try fits: ray_launcher.start_retries);
    that worker resumes the 2-rank checkpoint on 1 rank × 16 (the global batch kept) and
    trains to the end: the job succeeds, every step is logged once, and no sample of the epoch
    is trained twice (train.log_sample_ids)."""
    run_dir = ray_head.base / "shared" / "runs" / "elastic"
    args = _tiny(ray_head, "elastic", *STOP_ARGS, "dist.min_workers=1")
    args += ["train.global_batch_size=16", "train.log_sample_ids=true"]  # the tiny run's 2 × 8
    # 6 steps, checkpoints at 3 and 6 only (each costs seconds: Ray copies it), one
    # evaluation (at the end). Should the refreshed view still count the lost node, that
    # start waits 22 s (> the 20 s between Ray's own refreshes) before the retry; should the
    # retry still see it, dist.max_failures=2 allows one more (22 s more, only then).
    args += ["train.epochs=0.03", "checkpoint.every_steps=3", "train.eval_every=0"]
    args += ["dist.worker_start_timeout_s=22", "dist.max_failures=2"]
    t0 = time.monotonic()
    job = ray_head.start("elastic", *args)
    clock = JobLogClock(ray_head, job, t0)
    assert _until(lambda: _complete_steps(run_dir), JOB_TIMEOUT_S), ray_head.ray(
        "job", "logs", job
    )[-3000:]
    before, logged = max(_complete_steps(run_dir)), len(_steps(run_dir))
    t_stop = time.monotonic()
    _stop(second_node)  # every process of the second node: its raylet and its worker
    status, logs = ray_head.ended(job)
    clock.stop()
    print(f"\nnode loss: job {status}, {t_stop - t0:.1f} s to the stop, "
          f"{time.monotonic() - t_stop:.1f} s after it")  # fmt: skip
    assert status == "SUCCEEDED", logs[-5000:]
    # the controller's refresh (ray_elastic) ran on the failure and said so in the job log
    assert "[fne] cluster view re-read after a failure" in logs, logs[-5000:]
    lines = [ln for ln in logs.splitlines() if "a checkpoint of 2 rank(s) × 8" in ln]
    assert lines and "resuming on 1 rank(s) × 16" in lines[0], logs[-5000:]
    print(f"before the stop: {logged} steps logged, checkpoint of step {before} complete")
    keys = ("Detected ready resources", "FailurePolicy", "Source:", "resum", "Error count",
            "startup timed out", "cluster view re-read", "worker group of size", "step 1/",
            "Deciding NOT")  # fmt: skip
    print(f"the job log's key lines, s since the submission (the stop at {t_stop - t0:.1f} s):")
    print("\n".join(clock.lines(keys)))
    _, last = find_resumable("latest", run_dir / "checkpoints", print, None)
    assert last["world_size"] == 1 and last["step"] > before, (last, before)
    assert _steps(run_dir) == list(range(1, last["step"] + 1))
    resumed = [ln for ln in logs.splitlines() if "resumed from" in ln]
    resumed_at = int(resumed[-1].split("optimizer step ")[1].split(",")[0])
    assert 3 <= resumed_at <= before, (resumed_at, before)
    batches = global_batches(run_dir, resumed_at)
    assert sorted(batches) == list(range(1, last["step"] + 1)), sorted(batches)
    assert all(len(ids) == 16 for ids in batches.values()), batches
    seen = [i for step in sorted(batches) for i in batches[step]]
    assert len(seen) == len(set(seen)), "a sample of the epoch was trained twice"
