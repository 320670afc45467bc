"""Two "nodes" on one machine: two torchrun agents (``--nnodes 2 --nproc_per_node 1``), each with
its own node-local directories (cwd, run.output_dir, data.cache_dir), rendezvous at 127.0.0.2
(a loopback address standing for the first node's), and one shared directory standing for the
cluster file system. Only such a layout shows the faults of a run that spans nodes: a
checkpoint holding only the files rank 0 can see, a node-local checkpoint.dir, a resume that
finds its checkpoint on one node only.

Processes: every command runs in its own session and is killed by process group at its
timeout; marked stragglers are reaped by PID (the launcher tests' helpers).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fne_dist.distributed.launch import free_port
from tests.launch_helpers import (
    BIN,
    global_batches,
    marked_pids,
    reap,
    sandbox_env,
    train_args,
)

pytestmark = pytest.mark.system

RUN_TIMEOUT_S = 240.0
STEPS = 10  # train_args: 0.05 epochs at world size 2
EVERY = 3  # a checkpoint every 3 optimizer steps: 3, 6, 9 and the end (10)
NODE_ADDR = "127.0.0.2"  # node 0's address; loopback, so the test reaches nothing outside


def _node_cmd(node: int, port: int, run: str, *extra: str) -> list[str]:
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1"]
    cmd += ["--node_rank", str(node), "--master_addr", NODE_ADDR, "--master_port", str(port)]
    # The DDP twin: what is tested is the layout across nodes, and DeepSpeed's JIT-built comm
    # op (minutes when its cache is cold on a busy machine) would only add time.
    short = ("train.log_every=1", "dist.rendezvous_timeout_s=60", "engine.kind=ddp")
    short += (f"run.name={run}",)
    return cmd + train_args(2, *short, *extra)


class TwoNodes:
    """Starts both nodes' torchrun agents, each in its own directory, and waits for them."""

    def __init__(self, base: Path, env: dict[str, str], marker: str) -> None:
        self.base, self.env, self.marker = base, env, marker
        self.shared = base / "shared"  # the cluster file system

    def node_dir(self, node: int) -> Path:
        return self.base / f"node{node}"

    def start(self, name: str, run: str, *extra: str) -> list[subprocess.Popen]:
        """Both nodes of run ``run`` (logs: ``<node dir>/<name>.log``)."""
        port = free_port()
        procs = []
        for node in (0, 1):
            work = self.node_dir(node)
            work.mkdir(parents=True, exist_ok=True)
            log = (work / f"{name}.log").open("w")
            cmd = [c.replace("{work}", str(work)) for c in _node_cmd(node, port, run, *extra)]
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=work,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        return procs

    def wait(self, procs: list[subprocess.Popen], timeout_s: float = RUN_TIMEOUT_S) -> list:
        """Exit codes (None: killed at the timeout); one failing node stops the other
        within 90 s (its collectives fail), else it is killed too."""
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 90)
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
        for p in procs:
            kill(p)
        reap(self.marker, grace_s=10)
        return codes

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL every process of ours running in node ``node``'s directory: its torchrun
        agent and the training process (which torchrun starts in a session of its own)."""
        killed = []
        for pid in marked_pids(self.marker):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cwd").resolve() == self.node_dir(node).resolve():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

    def log(self, node: int, name: str) -> str:
        return (self.node_dir(node) / f"{name}.log").read_text()


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    marker = uuid.uuid4().hex
    ray_tmp = tmp_path_factory.mktemp("ray")
    env = sandbox_env(ray_tmp, marker)
    env["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.2 lives on lo
    yield TwoNodes(tmp_path_factory.mktemp("twonodes"), env, marker)
    reap(marker, grace_s=5)


def history(node_dir: Path, run: str) -> list[dict]:
    path = node_dir / "out" / run / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def meta(step_dir: Path) -> dict:
    return json.loads((step_dir / "meta.json").read_text())


@pytest.fixture(scope="module")
def straight(nodes: TwoNodes) -> dict:
    """An uninterrupted two-node run with a shared checkpoint.dir."""
    ckpt = nodes.shared / "straight"
    extra = (f"checkpoint.dir={ckpt}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=0")
    procs = nodes.start("straight", "straight", *extra)
    codes = nodes.wait(procs)
    assert codes == [0, 0], nodes.log(0, "straight")[-3000:] + nodes.log(1, "straight")[-3000:]
    return {"ckpt": ckpt, "history": history(nodes.node_dir(0), "straight")}


@pytest.mark.timeout(600)
def test_two_node_checkpoint_lists_every_ranks_files(nodes: TwoNodes, straight: dict) -> None:
    """Invariant: a checkpoint of a run spanning two nodes is complete: meta.json lists and
    hashes both ranks' files (rank-00000.* and rank-00001.*, written on different nodes),
    the shared directory holds no leftover step-N.tmp, and every step-N validates."""
    from fne_dist.checkpoint.validation import list_checkpoints, validate

    found = list_checkpoints(straight["ckpt"])
    assert [p.name for p in found] == [f"step-{s:08d}" for s in (3, 6, 9, STEPS)]
    for step_dir in found:
        files = validate(step_dir)["files"]
        for rank in (0, 1):
            assert f"rank-{rank:05d}.json" in files and f"rank-{rank:05d}.safetensors" in files
    assert not list(nodes.base.rglob("step-*.tmp")), list(nodes.base.rglob("step-*.tmp"))
    assert meta(found[-1])["world_size"] == 2
    print(f"\n{found[-1]}: " + ", ".join(sorted(validate(found[-1])["files"])))


@pytest.mark.timeout(300)
def test_node_local_checkpoint_dirs_fail_at_launch(nodes: TwoNodes) -> None:
    """Invariant: with checkpoint.dir left to its default under each node's own
    run.output_dir, both nodes stop before training with one line naming the directory and
    the node that does not see rank 0's marker."""
    procs = nodes.start("local-ckpt", "local-ckpt")
    codes = nodes.wait(procs, timeout_s=180)
    assert all(c not in (0, None) for c in codes), codes
    for node in (0, 1):
        log = nodes.log(node, "local-ckpt")
        lines = [ln for ln in log.splitlines() if "is not shared between nodes" in ln]
        assert lines, log[-3000:]
        assert "node(s) 1 do not see" in lines[0] and "checkpoint.dir=" in lines[0]
        assert "loss=" not in log  # failed before the first step


@pytest.mark.timeout(600)
def test_kill_one_node_then_resume_both_from_a_url_checkpoint(
    nodes: TwoNodes, straight: dict
) -> None:
    """Invariant: with a URL checkpoint.dir (file:// on the shared directory) and node-local
    scratch, every uploaded checkpoint validates and holds both ranks' files although each node
    wrote only its own; node 1's process killed mid-run after a checkpoint exists, both nodes
    resumed with checkpoint.resume=latest continue from that complete checkpoint: the logged
    steps after the resume continue the sequence up to the end, and their losses equal the
    uninterrupted (shared-directory) run's at the same steps."""
    from fne_dist.checkpoint.remote import find_resumable_remote
    from fne_dist.checkpoint.validation import list_checkpoints, validate

    remote = nodes.shared / "killed"
    extra = (f"checkpoint.dir=file://{remote}", f"checkpoint.every_steps={EVERY}")
    extra += ("checkpoint.keep_last=0",)
    procs = nodes.start("killed", "killed", *extra)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    first = remote / f"step-{EVERY:08d}" / "meta.json"  # uploaded last, after every rank's part
    while not first.is_file() and time.monotonic() < deadline and procs[1].poll() is None:
        time.sleep(0.2)
    assert first.is_file(), nodes.log(0, "killed")[-3000:]
    assert nodes.kill_node(1), "node 1 had no process to kill"  # dies mid-run
    nodes.wait(procs, timeout_s=120)
    before = history(nodes.node_dir(0), "killed")
    assert before and before[-1]["step"] < STEPS, before

    codes = nodes.wait(nodes.start("resumed", "killed", *extra, "checkpoint.resume=latest"))
    log0 = nodes.log(0, "resumed")
    assert codes == [0, 0], log0[-3000:] + nodes.log(1, "resumed")[-3000:]
    resumed = [ln for ln in log0.splitlines() if "resumed from" in ln]
    assert resumed, log0[-3000:]
    step = int(resumed[0].split("optimizer step ")[1].split(",")[0])
    assert step >= EVERY and step % EVERY == 0
    assert step <= before[-1]["step"], (step, before[-1])
    # the lines of steps the resumed run redid were dropped, so every step is there once
    whole = history(nodes.node_dir(0), "killed")
    assert [h["step"] for h in whole] == list(range(1, STEPS + 1)), whole
    after = whole[step:]
    reference = {h["step"]: h["loss"] for h in straight["history"]}
    assert [h["loss"] for h in after] == [reference[h["step"]] for h in after]

    for step_dir in list_checkpoints(remote):  # the uploaded ones: complete
        files = validate(step_dir)["files"]
        assert {f"rank-{r:05d}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")} <= set(
            files
        )
    local1 = nodes.node_dir(1) / "out" / "killed" / "checkpoints-local"
    assert not list(local1.glob("step-*/rank-00000.json"))  # node 1 never held rank 0's part
    _, last = find_resumable_remote(f"file://{remote}", nodes.base / "fetched", print)
    assert last["step"] == STEPS and last["world_size"] == 2
    print(f"\nkilled after step {before[-1]['step']}; {resumed[0].strip()}")
    print(f"steps logged: {[h['step'] for h in whole]}")


# ---------------------------------------------------------------------------------------------
# torchrun's elastic mode: `--nnodes 1:2`, a c10d rendezvous, and a lost node


# 7 steps of 16 (182 per epoch): checkpoints at 3 and 6 and the end; the loss comes after the
# first, so the resumed worker trains 4 steps (or 1) on one rank before its final evaluation.
ELASTIC_EPOCHS, ELASTIC_STEPS = 0.035, 7


def _elastic_cmd(node: int, port: int, run: str, *extra: str) -> list[str]:
    """Node ``node``'s agent of an elastic run: node 0 hosts the rendezvous store (is_host:
    both addresses are loopback, so torch's own guess would make both try to host it)."""
    cmd = [str(BIN / "torchrun"), "--nnodes", "1:2", "--nproc_per_node", "1"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{NODE_ADDR}:{port}"]
    cmd += ["--rdzv-id", run, "--local-addr", f"127.0.0.{2 + node}", "--max-restarts", "2"]
    # last_call: how long a rendezvous that has its minimum (1 node) waits for more. The
    # first round completes the moment both agents have joined (its maximum), which they do
    # within a second or two of each other (started together; node 1 connects to node 0's
    # store); the round after the loss has only node 0 and forms last_call later: every
    # second of it is a second of this test (was 10 s).
    # keep_alive: a node that has not renewed its heartbeat for interval × attempts is taken
    # as gone, which the next round waits for (torch's 5 s × 3: 15 s); 1 s × 5 tolerates four
    # missed beats of a live agent on a loaded machine.
    conf = f"is_host={'true' if node == 0 else 'false'},join_timeout=60,last_call_timeout=5"
    conf += ",keep_alive_interval=1,keep_alive_max_attempt=5"
    cmd += ["--rdzv-conf", conf]
    short = ("train.log_every=1", "dist.rendezvous_timeout_s=60", "engine.kind=ddp")
    return cmd + train_args(2, *short, f"run.name={run}", *extra)


@pytest.mark.timeout(400)
def test_torchrun_elastic_loses_a_node_and_goes_on_with_one(nodes: TwoNodes) -> None:
    """Invariant: a `torchrun --nnodes 1:2` run (c10d rendezvous hosted by node 0's agent,
    train.global_batch_size=16, a shared checkpoint.dir) whose other node (agent and worker)
    is SIGKILLed after a complete checkpoint goes on by itself: the surviving agent restarts
    its worker (TORCHELASTIC_RESTART_COUNT=1), the rendezvous re-forms with one node, the
    worker resumes the latest complete 2-rank checkpoint on 1 rank × 16 without being told to
    (no checkpoint.resume: the restart count says it is the same run) and trains to the end;
    every step of the epoch is trained once with 16 samples, and no sample twice."""
    from fne_dist.checkpoint.validation import find_resumable, list_checkpoints

    run, shared = "elastic", nodes.shared / "elastic"
    extra = (f"checkpoint.dir={shared}", f"checkpoint.every_steps={EVERY}")
    extra += ("checkpoint.keep_last=0", "train.global_batch_size=16", "train.log_sample_ids=true")
    extra += ("train.eval_every=0", f"train.epochs={ELASTIC_EPOCHS}")
    port, procs = free_port(), []
    t0 = time.monotonic()
    for node in (0, 1):
        work = nodes.node_dir(node)
        work.mkdir(parents=True, exist_ok=True)
        cmd = [c.replace("{work}", str(work)) for c in _elastic_cmd(node, port, run, *extra)]
        with (work / f"{run}.log").open("w") as log:
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=work,
                    env={**nodes.env, "LOGLEVEL": "INFO"},  # the agents' rendezvous lines
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    first = shared / f"step-{EVERY:08d}" / "meta.json"  # written last, after every rank's part
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not first.is_file() and time.monotonic() < deadline and procs[1].poll() is None:
        time.sleep(0.2)
    assert first.is_file(), nodes.log(0, run)[-3000:] + nodes.log(1, run)[-3000:]
    before = max(meta(d)["step"] for d in list_checkpoints(shared))
    t_kill = time.monotonic()
    assert nodes.kill_node(1), "node 1 had no process to kill"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    code = procs[0].poll()
    for p in procs:
        kill(p)
    reap(nodes.marker, grace_s=10)
    log0 = nodes.log(0, run)
    print(f"\nelastic: {t_kill - t0:.1f} s to the kill, {time.monotonic() - t_kill:.1f} s after")
    keys = ("Rendezvous complete", "restart_count", "group_world_size=", "FAILED", "resum")
    agent = [ln.split("] ", 1)[-1].strip() for ln in log0.splitlines()]
    agent = [ln for ln in agent if any(k in ln for k in keys)]
    print("\n".join(agent))
    assert code == 0, log0[-5000:]
    # the agent's own account: the group failed, was restarted once and re-formed with 1 node
    assert any("Worker group FAILED" in ln and "will restart" in ln for ln in agent), log0[-5000:]
    after = agent[agent.index("restart_count=1") :]
    assert "group_world_size=1" in after, agent
    lines = [ln for ln in log0.splitlines() if "a checkpoint of 2 rank(s) × 8" in ln]
    assert lines and "resuming on 1 rank(s) × 16" in lines[0], log0[-5000:]
    resumed = [ln for ln in log0.splitlines() if "resumed from" in ln]
    assert resumed, log0[-5000:]
    resumed_at = int(resumed[-1].split("optimizer step ")[1].split(",")[0])
    assert EVERY <= resumed_at <= before + EVERY and resumed_at % EVERY == 0, (resumed_at, before)
    _, last = find_resumable("latest", shared, print, None)
    assert last["world_size"] == 1 and last["step"] == ELASTIC_STEPS, last
    run_dirs = [nodes.node_dir(n) / "out" / run for n in (0, 1)]
    batches = global_batches(run_dirs[0], resumed_at, lost=(run_dirs[1],))
    assert sorted(batches) == list(range(1, ELASTIC_STEPS + 1)), sorted(batches)
    assert all(len(ids) == 16 for ids in batches.values()), batches
    seen = [i for step in sorted(batches) for i in batches[step]]
    assert len(seen) == len(set(seen)), "a sample of the epoch was trained twice"
