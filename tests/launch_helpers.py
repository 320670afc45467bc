"""Running `python -m fne_dist.train` under a real launcher in a sandbox, for the system tests.

Isolation: every run gets its own directory (cwd, output, cache) and a free loopback port;
launcher variables inherited from whatever started pytest are dropped; Ray gets a short private
RAY_TMPDIR (so `ray.init()` starts its own local instance and never attaches to another cluster
on the machine) with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (every Ray port on loopback); gloo uses
the loopback interface. Every child carries a marker variable: after each run the caller waits
for all marked processes to exit and kills stragglers by PID (``reap``). DeepSpeed's
JIT-compiled comm op is cached in one directory shared by all runs (see ``sandbox_env``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fne_dist.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
ACCELERATE_CONFIG = ROOT / "cluster" / "accelerate" / "multi_node.yaml"
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 240.0  # one launcher run (each takes ~10-60 s on 2 busy cores)
FAIL_FAST_S = 60.0  # a bad-input error must come well before any training could finish
MARKER = "FNE_LAUNCHER_TEST"


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


def is_launcher_var(key: str) -> bool:
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


def sandbox_env(ray_tmp: Path, marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not is_launcher_var(k)}
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


def marked_pids(marker: str) -> list[int]:
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


def reap(marker: str, grace_s: float = 20.0) -> list[int]:
    """Wait for every marked process to exit; kill the ones still alive after ``grace_s``
    (all were started by this module) and return their PIDs."""
    deadline = time.monotonic() + grace_s
    while (alive := marked_pids(marker)) and time.monotonic() < deadline:
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
    leftovers = reap(sandbox.marker)
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


def global_batches(
    run_dir: Path, resumed_at: int, lost: tuple[Path, ...] = ()
) -> dict[int, list[int]]:
    """step → the global batch's sample ids (train.log_sample_ids) as trained by a run that
    was resumed on one rank at optimizer step ``resumed_at``: up to it every rank's rows of
    the earlier attempt, after it rank 0's last rows in ``run_dir`` (a restarted rank appends
    to its file: its rows of redone steps come after the earlier attempt's). ``lost``: run
    directories of nodes that are gone (node-local run dirs), read for the earlier attempt
    only."""
    batches: dict[int, list[int]] = {}
    for where in (run_dir, *lost):
        for path in sorted(where.glob("sample_ids-rank*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] <= resumed_at:
                    batches.setdefault(row["step"], []).extend(row["ids"])
                elif where == run_dir and path.name == "sample_ids-rank00000.jsonl":
                    batches[row["step"]] = row["ids"]
    return batches
