"""Checkpoints and exact resume with real processes (`python -m fne_dist.train`, DeepSpeed)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fne_dist.checkpoint.format import ENGINE_TAG, CheckpointError, RankState, sha256_of
from fne_dist.checkpoint.remote import remote_checkpoints
from fne_dist.checkpoint.validation import find_resumable, list_checkpoints, validate
from tests.launch_helpers import MARKER, marked_pids

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
pytestmark = [pytest.mark.system, pytest.mark.slow]

# 19 steps of 16 pairs (0.1 epoch), a loss per log line, checkpoints at steps 8 and 16 + end
COMMON = ["train.log_every=1", "checkpoint.every_steps=8", "checkpoint.keep_last=0"]


def _env() -> dict[str, str]:
    """No launcher variables from whatever started pytest; the venv's tools (torchrun) first."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _train(tmp: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fne_dist.train",
            "--config",
            str(TINY),
            f"run.output_dir={tmp}",
            f"run.name={name}",
            f"data.cache_dir={tmp / 'cache'}",
            *COMMON,
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 19-step run with checkpoints at steps 8, 16 and 19."""
    tmp = tmp_path_factory.mktemp("ckpt")
    run = _train(tmp, "straight")
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "straight"


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_resume_in_a_new_process_equals_the_uninterrupted_run(
    straight: Path, tmp_path: Path
) -> None:
    """Invariant: resuming from the step-8 checkpoint (mid-epoch: the data position, shuffle
    buffer, memory, statistics, optimizer, scheduler and RNG all restored) in a new process
    gives bit-identical losses for steps 9..19, final memory, statistics and weights."""
    names = [p.name for p in list_checkpoints(straight / "checkpoints")]
    assert names == ["step-00000008", "step-00000016", "step-00000019"]
    start = straight / "checkpoints" / "step-00000008"
    run = _train(tmp_path, "resumed", f"checkpoint.resume={start}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout + run.stderr
    resumed = tmp_path / "resumed"
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(9, 20))
    assert all(a[s] == b[s] for s in b), {s: (a[s], b[s]) for s in b if a[s] != b[s]}
    for name in ("memory.safetensors", "stats.safetensors", "momentum.safetensors"):
        x = load_file(str(straight / "checkpoints" / "step-00000019" / name))
        y = load_file(str(resumed / "checkpoints" / "step-00000019" / name))
        assert x.keys() == y.keys(), name
        for k in x:  # bitwise; NaN (no μ⁺ yet) counts as equal to NaN
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True, msg=name)
    wa, wb = (
        load_file(str(straight / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    assert all((wa[k] == wb[k]).all() for k in wa)
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert ma["test"] == mb["test"]


def test_the_run_directory_and_its_checkpoints_hold_one_resolved_config(tmp_path: Path) -> None:
    """Invariant: config.yaml is written once, resolved: with train.warmup_epochs the run
    directory's copy and every checkpoint's are the same text, the warm-up counted in steps
    (warmup_epochs resolved to null), so what a resume compares is what the run directory
    shows."""
    run = _train(
        tmp_path, "resolved", "engine.kind=ddp", "train.epochs=0.03",
        "train.warmup_epochs=0.02", "train.warmup_steps=0",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "resolved"
    text = (run_dir / "config.yaml").read_text()
    assert "warmup_epochs: null" in text
    saved = list_checkpoints(run_dir / "checkpoints")
    assert saved and all((s / "config.yaml").read_text() == text for s in saved)


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_corrupt_latest_falls_back_to_the_previous_valid_one(
    straight: Path, tmp_path: Path
) -> None:
    """Invariant: with the newest checkpoint truncated, resume=latest warns naming it and resumes
    from the previous valid one; with every checkpoint broken, it fails with one clear line."""
    root = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", root)
    memory = root / "step-00000019" / "memory.safetensors"
    memory.write_bytes(memory.read_bytes()[:100])  # truncated
    run = _train(tmp_path, "fallback", "checkpoint.resume=latest", f"checkpoint.dir={root}")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "skipping invalid checkpoint" in out and "step-00000019" in out
    assert "resumed from" in out and "step-00000016" in out
    assert sorted(_losses(tmp_path / "fallback")) == [17, 18, 19]

    for step in ("step-00000008", "step-00000016"):
        (root / step / "meta.json").unlink()  # an interrupted write never got its meta.json
    memory.write_bytes(b"")
    run = _train(tmp_path, "none", "checkpoint.resume=latest", f"checkpoint.dir={root}")
    assert run.returncode == 2
    assert (
        run.stderr.strip().splitlines()[-1].startswith("error: checkpoint.resume=latest: no valid")
    )


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_a_flipped_byte_is_refused_by_its_hash(straight: Path, tmp_path: Path) -> None:
    """Invariant: a checkpoint file with one byte changed at the same size (which the size check
    cannot see) is refused by its sha256, naming the file, and resume=latest falls back past it
    to the previous valid checkpoint with a warning (the function the loop resumes through)."""
    root = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", root)
    newest = root / "step-00000019"
    for name in ("memory.safetensors", f"{ENGINE_TAG}/mp_rank_00_model_states.pt"):
        path = newest / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        assert path.stat().st_size == len(data)
        with pytest.raises(CheckpointError, match="sha256") as refused:
            validate(newest)
        assert Path(name).name in str(refused.value)
        shutil.copy2(straight / "checkpoints" / "step-00000019" / name, path)  # undo
    memory = newest / "memory.safetensors"
    data = bytearray(memory.read_bytes())
    data[-1] ^= 0xFF
    memory.write_bytes(bytes(data))
    warnings: list[str] = []
    path, meta = find_resumable("latest", root, warnings.append)
    assert path.name == "step-00000016" and meta["step"] == 16
    assert len(warnings) == 1 and "step-00000019" in warnings[0] and "sha256" in warnings[0]


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_checkpoint_counters_survive_the_train_state(straight: Path) -> None:
    """Invariant: the loop's TrainState reads a real checkpoint's counters and data position
    and writes them back unchanged (the same JSON), so a resumed run saves what it loaded:
    the checkpoint layout did not change with the state object."""
    from fne_dist.state import TrainState

    for directory in list_checkpoints(straight / "checkpoints"):
        doc = json.loads((directory / "rank-00000.json").read_text())
        saved = RankState(doc["counters"], doc["data_position"])
        # mid-epoch checkpoints (0.1 epoch): no epoch reset on load
        state = TrainState.from_rank_state(saved, torch.device("cpu"), 10**9, 3)
        again = state.to_rank_state(global_batch=16, with_history=True)
        assert json.dumps(again.counters) == json.dumps(doc["counters"]), directory.name
        assert again.data_position == doc["data_position"], directory.name


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_resume_with_a_changed_lr_is_refused_in_one_line(straight: Path, tmp_path: Path) -> None:
    """Invariant: resuming with optim.lr changed (which the restored optimizer and schedule
    would silently ignore while config.yaml recorded the new value) exits 2 before any step,
    with one line naming optim.lr with both values; the checkpoint records its shards."""
    start = straight / "checkpoints" / "step-00000008"
    assert validate(start)["data"]["train"].endswith("emoji-train-*.tar.gz")
    run = _train(tmp_path, "changed-lr", f"checkpoint.resume={start}", "optim.lr=1e-5")
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2, run.stderr[-3000:]
    assert last.startswith("error: resume from") and "optim.lr=1e-05 differs" in last, last
    assert "checkpoint's optim.lr=0.001" in last
    assert not (tmp_path / "changed-lr" / "train_log.jsonl").is_file() or not _losses(
        tmp_path / "changed-lr"
    )


class _Trap:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_a_foreign_pickle_in_engine_files_is_refused(straight: Path, tmp_path: Path) -> None:
    """Invariant: a checkpoint whose DeepSpeed file holds a pickle that builds an arbitrary
    object (here one that would create a file) is refused naming the file, even with matching
    hashes, and the pickle never runs."""
    bad = tmp_path / "step-00000016"
    shutil.copytree(straight / "checkpoints" / "step-00000016", bad)
    marker = tmp_path / "pwned"
    target = next((bad / ENGINE_TAG).rglob("*model_states.pt"))
    target.write_bytes(pickle.dumps({"module": _Trap(str(marker))}))
    meta = json.loads((bad / "meta.json").read_text())
    name = str(target.relative_to(bad))
    meta["files"][name] = {"size": target.stat().st_size, "sha256": sha256_of(target)}
    (bad / "meta.json").write_text(json.dumps(meta))
    run = _train(tmp_path, "foreign", f"checkpoint.resume={bad}")
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused to load" in last and target.name in last
    assert not marker.exists()


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_resume_with_another_global_batch_fails_clearly(straight: Path, tmp_path: Path) -> None:
    """Invariant: a checkpoint of 1 rank × 16 resumed by 2 ranks × 16 (torchrun, no
    train.global_batch_size: the global batch, and with it the loss and the memory's enqueue,
    would double) is refused before any step with one line naming both global batches and the
    two ways on."""
    run = _torchrun(
        tmp_path,
        "other-world",
        f"checkpoint.resume={straight / 'checkpoints' / 'step-00000008'}",
        "train.batch_size=16",
    )
    assert run.returncode != 0  # each rank exits 2; torchrun reports its failed children
    out = run.stdout + run.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert lines and all(ln == lines[0] for ln in lines), out[-3000:]  # one line (per rank)
    assert "global batch of 1 ranks × 16 = 16, this run's is 2 × 16 = 32" in lines[0]
    assert "train.global_batch_size=16" in lines[0]
    log = tmp_path / "other-world" / "train_log.jsonl"
    assert not log.exists() or not _losses(tmp_path / "other-world")


def _free_port() -> int:
    from fne_dist.distributed.launch import free_port

    return free_port()


def _evaluate(directory: Path) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "fne_dist.evaluate", str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.timeout(600)  # may build the module's `straight` run first
def test_export_loads_without_deepspeed_and_retrieves(straight: Path, tmp_path: Path) -> None:
    """Invariant: `python -m fne_dist.export` of the run and of a checkpoint writes fp32
    safetensors + config that `fne_dist.evaluate` reads (the run's export reproduces its test
    metrics), and the encode/retrieve API over the test split reproduces the run's i2t R@1."""
    from fne_dist.api import Retriever, top_k
    from fne_dist.data import shard_list
    from fne_dist.data.decode import decode_sample
    from fne_dist.data.plan import Piece
    from fne_dist.data.stream import raw_samples
    from fne_dist.export import main as export_main
    from fne_dist.retrieval_metrics import retrieval_metrics

    run_out, step_out = tmp_path / "from-run", tmp_path / "from-step16"
    assert export_main([str(straight), str(run_out)]) == 0
    assert export_main([str(straight / "checkpoints" / "step-00000016"), str(step_out)]) == 0
    expected = json.loads((straight / "metrics.json").read_text())["test"]
    got = _evaluate(run_out)
    assert all(got[k] == pytest.approx(expected[k], abs=1e-6) for k in expected)
    assert 0 <= _evaluate(step_out)["rsum"] <= 600

    retriever = Retriever.load(run_out)
    test = shard_list(str(ROOT / "shards" / "emoji" / "emoji-test-*.tar.gz"), "t")
    images, captions, groups_of = [], [], []
    for url, size in zip(test.urls, test.sizes, strict=True):
        for sample in raw_samples(url, Piece(0, 0, size)):
            d = decode_sample(sample, all_captions=True)
            images.append(d.image)
            captions.append(d.captions)
            groups_of.append(d.group)
    assert all(len(c) == 1 for c in captions)  # the emoji test split: one caption per image
    img, txt = retriever.encode_images(images), retriever.encode_texts([c[0] for c in captions])
    groups = torch.tensor(groups_of)
    metrics = retrieval_metrics(img @ txt.T, torch.arange(len(images)), groups)
    assert all(metrics[k] == pytest.approx(expected[k], abs=1e-6) for k in expected)
    scores, index = top_k(img, txt, k=5)
    torch.testing.assert_close(scores, (img @ txt.T).gather(1, index))
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


@pytest.mark.timeout(600)  # two tiny trainings
def test_ddp_twin_with_a_url_checkpoint_dir_resumes_exactly(tmp_path: Path) -> None:
    """Invariant: the plain-DDP comparison engine (engine.kind=ddp) writes its state through the
    checkpoint's own writer (engine/state.safetensors + state.json, no pickle: the one layout);
    with checkpoint.dir an fsspec URL (file:// here: the same code path as s3://) checkpoints
    are uploaded complete (meta.json last, keep_last honoured), and checkpoint.resume=latest
    downloads the newest valid one and repeats the uninterrupted run's losses bitwise."""
    url = f"file://{tmp_path / 'remote'}"
    common = ("engine.kind=ddp", f"checkpoint.dir={url}")
    run = _train(tmp_path, "url", *common, "checkpoint.keep_last=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert remote_checkpoints(url) == ["step-00000016", "step-00000019"]
    step16 = tmp_path / "remote" / "step-00000016"
    assert validate(step16)["step"] == 16
    assert {p.name for p in (step16 / ENGINE_TAG).iterdir()} == {
        "state.safetensors",
        "state.json",
    }
    shutil.rmtree(tmp_path / "remote" / "step-00000019")  # as if lost: resume from 16
    run = _train(tmp_path, "url-resumed", *common, "checkpoint.resume=latest")
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = _losses(tmp_path / "url"), _losses(tmp_path / "url-resumed")
    assert sorted(b) == [17, 18, 19] and all(a[s] == b[s] for s in b)


def _torchrun_cmd(tmp: Path, name: str, *overrides: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "fne_dist.train",
        "--config",
        str(TINY),
        f"run.output_dir={tmp}",
        f"run.name={name}",
        f"data.cache_dir={tmp / 'cache'}",
        "run.threads=1",
        "train.batch_size=8",
        "train.epochs=0.05",
        "train.log_every=1",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=0",
        "train.eval_every=4",  # periodic evaluations (ZeRO-3 gathers parameters for them)
        *overrides,
    ]


def _torchrun(tmp: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _torchrun_cmd(tmp, name, *overrides),
        cwd=ROOT,
        env={**_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=280,
    )


# CI time: ZeRO-3 only (each engine costs ~2.5 min here). It partitions parameters, gradients
# and optimizer state across the ranks, the most a 2-rank resume has to put back. The DDP twin
# resumes exactly on one rank above and on two nodes in test_multinode_*; a 2-rank ZeRO-2 resume
# runs only with FNE_ALL_ENGINES=1.
ENGINES = (
    ["engine.zero_stage=2", "engine.zero_stage=3", "engine.kind=ddp"]
    if os.environ.get("FNE_ALL_ENGINES") == "1"
    else ["engine.zero_stage=3"]
)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank ZeRO-3 run (10 steps, checkpoints every 4, evaluations every 4)."""
    tmp = tmp_path_factory.mktemp("zero3")
    run = _torchrun(tmp, "two", "engine.zero_stage=3")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return tmp


@pytest.mark.timeout(400)
@pytest.mark.parametrize("engine", ENGINES)
def test_two_rank_resume_is_exact(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    """Invariant: with 2 ranks (torchrun) under ZeRO-3 (partitioned parameters and optimizer
    state; ZeRO-2 and DDP with FNE_ALL_ENGINES=1), resuming from the step-4 checkpoint repeats
    the losses of steps 5..10 of the uninterrupted run bit for bit."""
    if engine == "engine.zero_stage=3":
        tmp_path = request.getfixturevalue("zero3")  # shared with the ZeRO-3 loop test below
    else:
        run = _torchrun(tmp_path, "two", engine)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    step4 = tmp_path / "two" / "checkpoints" / "step-00000004"
    assert validate(step4)["world_size"] == 2
    run = _torchrun(tmp_path, "two-resumed", engine, f"checkpoint.resume={step4}")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    a, b = _losses(tmp_path / "two"), _losses(tmp_path / "two-resumed")
    assert sorted(b) == list(range(5, 11)) and all(a[s] == b[s] for s in b), (a, b)


@pytest.fixture(scope="module")
def zero0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank ZeRO-0 run with the whole memory on each rank (10 steps,
    checkpoints every 4, evaluations every 4): the reference of the ZeRO-3 loop test and of the
    killed sharded run."""
    tmp = tmp_path_factory.mktemp("zero0")
    run = _torchrun(tmp, "zero0", "engine.zero_stage=0")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return tmp / "zero0"


@pytest.mark.timeout(600)
def test_zero3_loop_evaluates_and_saves_whole_weights(zero3: Path, zero0: Path) -> None:
    """Invariant: under ZeRO-3 (the tiny text embedding is large enough to be partitioned), the
    periodic and final evaluations run on every rank and give ZeRO-0's metrics, and the saved
    weights are whole tensors with ZeRO-0's shapes (not the empty local partitions)."""
    m0, m3 = (json.loads((d / "metrics.json").read_text()) for d in (zero0, zero3 / "two"))
    assert m3["steps"] == m0["steps"]
    assert [h["step"] for h in m3["history"] if "val" in h] == [4, 8]  # then the final one
    for key in ("rsum", "group_rsum"):
        assert m3["test"][key] == pytest.approx(m0["test"][key], abs=1e-6)
    w0 = load_file(str(zero0 / "model.safetensors"))
    w3 = load_file(str(zero3 / "two" / "model.safetensors"))
    assert {k: v.shape for k, v in w3.items()} == {k: v.shape for k, v in w0.items()}
    assert max(v.numel() for v in w3.values()) >= 100_000  # really a partitioned tensor


def _split_memory(whole_ckpt: Path, out: Path, world: int) -> Path:
    """A copy of a whole-memory checkpoint with its memory split into ``world`` shard files
    (what a sharded run writes), meta.json listing and hashing them: as if that run had been
    sharded and killed after this checkpoint."""
    from fne_dist.checkpoint.format import META, hash_files, save_tensors
    from fne_dist.checkpoint.validation import memory_shard_file
    from fne_dist.memory import ShardRange

    shutil.copytree(whole_ckpt, out)
    whole = load_file(str(out / "memory.safetensors"))
    (out / "memory.safetensors").unlink()
    K = whole["img"].shape[0]
    for r in range(world):
        s = ShardRange.of(K, r, world)
        part = {k: whole[k][s.lo : s.hi] for k in ("img", "txt", "ids", "groups", "seq")}
        part["ptr_writes"] = whole["ptr_writes"]
        part["shard"] = torch.tensor([s.lo, s.hi, K])
        save_tensors(out, memory_shard_file(r), part)
    meta = json.loads((out / META).read_text())
    names = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != META]
    meta.update(memory_shards=world, files=dict(sorted(hash_files(out, names).items())))
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


@pytest.mark.timeout(400)
def test_sharded_memory_run_resumes_and_equals_the_replicated_run(zero3: Path) -> None:
    """Invariant: 2 ranks (ZeRO-3) with ``memory.sharded=true``, resumed from a sharded step-4
    checkpoint (one memory file per rank), repeat the replicated run's losses at steps 5..10 bit
    for bit: the shards draw what the whole memory draws. The run's own checkpoints hold one
    memory file per rank (complete only with both), whose slots are the replicated run's memory
    at the same step."""
    step4 = _split_memory(zero3 / "two" / "checkpoints" / "step-00000004", zero3 / "split4", 2)
    assert validate(step4)["memory_shards"] == 2
    run = _torchrun(zero3, "sharded", "engine.zero_stage=3", "memory.sharded=true",
                    f"checkpoint.resume={step4}")  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    a, b = _losses(zero3 / "two"), _losses(zero3 / "sharded")
    assert sorted(b) == list(range(5, 11)) and all(a[s] == b[s] for s in b), (a, b)
    step8 = zero3 / "sharded" / "checkpoints" / "step-00000008"
    assert validate(step8)["memory_shards"] == 2 and not (step8 / "memory.safetensors").exists()
    whole = load_file(str(zero3 / "two" / "checkpoints" / "step-00000008" / "memory.safetensors"))
    parts = [load_file(str(step8 / f"memory-rank-{r:05d}.safetensors")) for r in range(2)]
    for key in ("img", "txt", "ids", "groups", "seq"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key
    assert all(torch.equal(p["ptr_writes"], whole["ptr_writes"]) for p in parts)


def _start_marked(tmp: Path, name: str, marker: str, *overrides: str) -> subprocess.Popen:
    """torchrun in a session of its own, every process it starts carrying ``marker`` (torchrun
    starts each rank in a session of its own too: a kill by process group would miss them)."""
    env = {**_env(), "OMP_NUM_THREADS": "1", MARKER: marker}
    log = (tmp / f"{name}.log").open("w")
    with log:
        cmd = _torchrun_cmd(tmp, name, *overrides)
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill_marked(marker: str) -> list[int]:
    """SIGKILL the launcher and both ranks (by PID): no handler runs, nothing is flushed."""
    pids = marked_pids(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@pytest.mark.timeout(400)
def test_sharded_zero0_run_killed_and_resumed_equals_the_uninterrupted_run(
    zero0: Path, tmp_path: Path
) -> None:
    """Invariant: 2 ranks (ZeRO-0) with ``memory.sharded=true`` from step 0, every process
    SIGKILLed mid-run once the step-4 checkpoint is complete, then started again with
    checkpoint.resume=latest, log steps 1..10 with the uninterrupted replicated ZeRO-0 run's
    losses bit for bit (the steps before the kill: a sharded run from scratch equals the
    replicated one; after it: the shards, pointer, statistics, optimizer and data position
    come back exactly). Its final checkpoint holds one memory file per rank whose slots are
    the uninterrupted run's final memory, with the same statistics and weights.

    The reference is the replicated run (shared with the ZeRO-3 loop test) rather than an
    uninterrupted sharded one: one run less, and the sharded run is meant to equal it."""
    marker, killed = uuid.uuid4().hex, tmp_path / "killed"
    proc = _start_marked(tmp_path, "killed", marker, "engine.zero_stage=0", "memory.sharded=true")
    try:
        first = killed / "checkpoints" / "step-00000004" / "meta.json"  # written last
        deadline = time.monotonic() + 240
        while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.is_file(), (tmp_path / "killed.log").read_text()[-3000:]
        assert len(_kill_marked(marker)) >= 3, "expected torchrun and its 2 ranks to kill"
        assert proc.wait(timeout=60) != 0
    finally:
        _kill_marked(marker)
        proc.wait()
    from fne_dist.plot import read_log  # skips a last line the kill cut short

    before = {r["step"]: r["loss"] for r in read_log(killed) if "loss" in r}
    assert not (killed / "metrics.json").exists() and max(before) < 10, before  # mid-run

    run = _torchrun(tmp_path, "killed", "engine.zero_stage=0", "memory.sharded=true",
                    "checkpoint.resume=latest")  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    resumed = next(ln for ln in out.splitlines() if "resumed from" in ln)
    step = int(resumed.split("optimizer step ")[1].split(",")[0])
    assert step in (4, 8) and step <= max(before), (resumed, before)
    a, b = _losses(zero0), _losses(killed)
    assert sorted(b) == list(range(1, 11)), b
    differ = {s: (a[s], b[s]) for s in b if a[s] != b[s]}
    assert not differ, f"killed after step {max(before)}, resumed at {step}: {differ}"
    final = killed / "checkpoints" / "step-00000010"
    assert validate(final)["memory_shards"] == 2 and not (final / "memory.safetensors").exists()
    reference = zero0 / "checkpoints" / "step-00000010"
    whole = load_file(str(reference / "memory.safetensors"))
    parts = [load_file(str(final / f"memory-rank-{r:05d}.safetensors")) for r in range(2)]
    for key in ("img", "txt", "ids", "groups", "seq"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key
    assert all(torch.equal(p["ptr_writes"], whole["ptr_writes"]) for p in parts)
    x, y = (load_file(str(d / "stats.safetensors")) for d in (reference, final))
    assert x.keys() == y.keys()
    for k in x:  # bitwise; NaN (no μ⁺ yet) counts as equal to NaN
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True, msg=k)
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (zero0, killed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"\nkilled after step {max(before)}; {resumed.strip()}; steps 1..10 equal the "
          f"replicated run's losses bit for bit")  # fmt: skip
