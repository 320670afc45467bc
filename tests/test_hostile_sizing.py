"""Sizes that cannot fit, and sizes this data makes meaningless.

A memory (or batch) that will not fit fails at launch with one line saying what it needs and
what is available, before anything is allocated. A memory larger than the training split and
a warm-up longer than an epoch (or the whole run) are named at launch, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fne_dist.config import ConfigError, load_config
from fne_dist.fne import Candidates
from fne_dist.memory import MomentumMemory
from fne_dist.sizing import check_fits, check_local_workers, launch_warnings, rank_needs
from fne_dist.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
CPU = torch.device("cpu")


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def test_hostile_estimate_covers_the_memory_and_its_candidate_copy() -> None:
    """Invariant: the memory term of the estimate is at least what the memory and the step's
    concatenated candidate block really allocate (two implementations: formula vs tensors)."""
    cfg = _cfg("memory.size=300", "model.embed_dim=24")
    memory = MomentumMemory(300, 24)
    G = cfg.train.batch_size
    batch = Candidates(
        torch.zeros(G, 24),
        torch.zeros(G, 24),
        torch.zeros(G, dtype=torch.long),
        G,
        torch.zeros(G, dtype=torch.long),
    )
    block = Candidates.concat(batch, memory.candidates())
    stored = [memory.img_KD, memory.txt_KD, memory.ids_K, memory.groups_K, memory.seq_K]
    copied = [block.img_ND, block.txt_ND, block.ids_N, block.groups_N]
    real = sum(t.nbytes for t in stored + copied)
    assert rank_needs(cfg).memory >= real


def test_hostile_boundary_of_what_fits() -> None:
    """Invariant: a config fits exactly when its estimate is at most the free bytes; otherwise
    one ConfigError line names memory.size, embed_dim, the need and the free bytes."""
    cfg = _cfg("memory.size=5000", "model.embed_dim=64")
    need = rank_needs(cfg).total
    check_fits(cfg, CPU, free=need, host_free=need)
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, CPU, free=need - 1, host_free=need)
    message = str(err.value)
    assert "\n" not in message and "memory.size=5000" in message and "embed_dim=64" in message
    assert "needs at least" in message and "available" in message


def test_hostile_ranks_of_one_host_share_its_memory() -> None:
    """Invariant: on the host, L local ranks need L times one rank's bytes; on a GPU each rank
    has its own device, but the host still builds each rank's memory once."""
    cfg = _cfg("memory.size=5000", "model.embed_dim=64")
    need = rank_needs(cfg).total
    check_fits(cfg, CPU, local_ranks=2, free=2 * need, host_free=0)
    with pytest.raises(ConfigError, match="for 2 ranks"):
        check_fits(cfg, CPU, local_ranks=2, free=2 * need - 1, host_free=0)
    gpu = torch.device("cuda", 0)
    check_fits(cfg, gpu, local_ranks=2, free=need, host_free=2 * 5000 * 64 * 4 * 2)
    with pytest.raises(ConfigError, match="built on the host"):
        check_fits(cfg, gpu, local_ranks=2, free=need, host_free=5000 * 64 * 4 * 2)


def test_hostile_train_refuses_an_impossible_memory_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: ``python -m fne_dist.train`` with a memory of 2^24 × 65,536 (4 TiB) exits 2
    with one ``error:`` line saying what it needs, instead of trying to allocate it."""
    code = train_main(
        [
            "--config",
            str(TINY),
            f"run.output_dir={tmp_path}",
            "memory.size=16777216",
            "model.embed_dim=65536",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err[-2000:]
    assert err.startswith("error: ") and "\n" not in err and "needs at least" in err


def test_hostile_ray_driver_refuses_before_starting_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: with a local Ray instance (the default launcher: 2 workers on this host) the
    driver refuses a memory its workers cannot hold together, with the same one line, before Ray
    starts (a worker's ConfigError would reach the driver as a Ray traceback)."""
    from fne_dist.distributed.ray_launcher import run_with_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = _cfg(
        f"run.output_dir={tmp_path}",
        "dist.workers=2",
        "memory.size=16777216",
        "model.embed_dim=65536",
    )
    with pytest.raises(ConfigError, match=r"needs at least .* for 2 ranks on this host"):
        run_with_ray(cfg)
    gpu = _cfg(
        "dist.workers=2",
        "dist.use_gpu=true",
        "engine.device=auto",
        "memory.size=5000",
        "model.embed_dim=64",
    )
    with pytest.raises(ConfigError, match="built on the host first"):
        check_local_workers(gpu, 2, host_free=5000 * 64 * 4 * 2 * 2 - 1)
    check_local_workers(gpu, 2, host_free=5000 * 64 * 4 * 2 * 2)


def _embedded_train_pairs() -> int:
    sizes = json.loads((ROOT / "shards" / "emoji" / "sizes.json").read_text())
    return sum(n for name, n in sizes.items() if "-train-" in name)


def test_hostile_default_run_on_the_embedded_data_is_not_warned() -> None:
    """Invariant: the default config on the data it was tuned for (memory ≤ half the split, a
    warm-up of exactly one epoch: the reference) produces no launch warning."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    pairs = _embedded_train_pairs()
    steps = pairs // (cfg.train.batch_size * cfg.dist.workers)
    total = int(cfg.train.epochs * steps) // cfg.engine.grad_accum
    assert launch_warnings(cfg, pairs, steps, total) == []


def test_hostile_memory_beyond_the_split_is_warned() -> None:
    """Invariant: memory.size above the number of training pairs gives one line naming both."""
    cfg = _cfg("memory.size=4000")
    lines = launch_warnings(cfg, 2924, 182, 1000)
    assert len(lines) == 1 and "memory.size=4000" in lines[0] and "2924 pairs" in lines[0]


def test_hostile_warmup_in_epochs_of_this_data() -> None:
    """Invariant: a warm-up longer than one epoch of this data is named with its length in
    epochs; one that covers the whole run says the configured loss never trains; one epoch or
    less (the reference) is silent."""
    cfg = _cfg("train.warmup_steps=91")
    (line,) = launch_warnings(cfg, 500, 15, 300)  # 500 pairs: 15 steps per epoch
    assert "train.warmup_steps=91" in line and f"{91 / 15:.2f} epochs" in line
    (line,) = launch_warnings(cfg, 500, 15, 91)
    assert "covers the whole run" in line and "never trains" in line
    assert launch_warnings(cfg, 5000, 91, 1000) == []


def test_hostile_warmup_epochs_resolve_to_this_datas_steps() -> None:
    """Invariant: train.warmup_epochs is one epoch of the data in use (optimizer steps, after
    gradient accumulation), so the shipped configs' one-epoch warm-up holds on any data; giving
    both warmup_steps and warmup_epochs is one ConfigError line."""
    from fne_dist.loop import resolve_warmup

    default = load_config(ROOT / "configs" / "default.yaml")
    assert default.train.warmup_epochs == 1.0 and default.train.warmup_steps == 0
    assert resolve_warmup(default, 91).train.warmup_steps == 91  # 2,924 pairs // 32
    assert resolve_warmup(default, 4531).train.warmup_steps == 4531  # Flickr30K's epoch
    half = load_config(ROOT / "configs" / "default.yaml", ["train.warmup_epochs=0.5"])
    assert resolve_warmup(half, 91).train.warmup_steps == 46
    accum = load_config(
        TINY, ["train.warmup_steps=0", "train.warmup_epochs=2", "engine.grad_accum=2"]
    )
    assert resolve_warmup(accum, 40).train.warmup_steps == 40  # 20 optimizer steps per epoch
    steps = _cfg()  # tiny.yaml counts steps
    assert resolve_warmup(steps, 91) is steps
    with pytest.raises(
        ConfigError, match=r"warmup_steps=7 and train\.warmup_epochs=1\.0 are both set"
    ):
        load_config(ROOT / "configs" / "default.yaml", ["train.warmup_steps=7"])
