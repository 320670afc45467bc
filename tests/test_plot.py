"""The FNE pictures: the similarity samples behind the histograms, the
curves drawn from the package's own functions, and the PNG files (synthetic run files here;
tests/test_train_e2e.py checks the tiny run's own pictures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fne_dist.config import load_config, save_config
from fne_dist.fne import SimilarityStats, gaussians_from_stats, mutual_top1_stats, stats_of
from fne_dist.fne import reference as ref
from fne_dist.monitoring.similarities import (
    Reservoir,
    SimilaritySamples,
    gaussians_from_dict,
    gaussians_to_dict,
    mutual_top1_samples,
    write_snapshot,
)
from fne_dist.plot import draw_fne, fne_curves, main, samples_per_second

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 20_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))  # axes, text and curves, not a blank


@pytest.mark.parametrize("seed", range(5))
def test_samples_are_what_the_statistics_sum(seed: int) -> None:
    """Invariant: the histogram's samples are exactly the statistics' samples: their sums
    (count, Σs, Σs²) equal ``mutual_top1_stats`` on the same matrix, with repeated ids (other
    captions of one image) and ties (a rounded matrix) present."""
    g = torch.Generator().manual_seed(seed)
    sim_BB = (torch.rand(24, 24, generator=g) * 2 - 1).round(decimals=1)
    sim_BB += 2 * torch.eye(24) * torch.rand(24, generator=g).round()  # some clear positives
    ids_B = torch.randint(0, 16, (24,), generator=g)
    pos, neg = mutual_top1_samples(sim_BB, ids_B)
    assert neg.numel() == 2 * pos.numel() > 0
    torch.testing.assert_close(stats_of(pos, neg), mutual_top1_stats(sim_BB, ids_B))


def test_reservoir_is_bounded_uniform_and_seeded() -> None:
    """Invariant: the reservoir never holds more than its capacity, keeps everything below
    it, is the same for the same seed, and is a uniform sample (each half of a long stream
    holds about half the slots)."""
    r = Reservoir(capacity=100, seed=3)
    r.extend([float(i) for i in range(50)])
    assert r.values == [float(i) for i in range(50)]
    r.extend([float(i) for i in range(50, 20_000)])
    assert len(r.values) == 100 and r.seen == 20_000
    again = Reservoir(capacity=100, seed=3)
    again.extend([float(i) for i in range(20_000)])
    assert again.values == r.values
    late = sum(v >= 10_000 for v in r.values)
    assert 30 <= late <= 70  # binomial(100, 0.5): outside this ~1e-4


def test_samples_of_every_step_are_read_at_log_windows_only() -> None:
    """Invariant: ``offer`` reads nothing (the rows wait on the device until ``sample``);
    one ``sample`` takes every block offered since the last one, once; the pending rows stay
    bounded by the capacity; a snapshot returns the samples and starts again."""
    samples = SimilaritySamples(capacity=1000)
    img = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    for _ in range(2):  # identical towers: all 8 rows are mutual top-1
        samples.offer(img, img.clone(), torch.arange(8))
    assert samples.pos.seen == 0
    samples.sample()
    samples.sample()  # nothing new: nothing added
    assert samples.pos.seen == 16 and samples.neg.seen == 32
    g = gaussians_from_stats(mutual_top1_stats(img @ img.T, torch.arange(8)))
    data = samples.snapshot(5, g)
    assert len(data["pos"]) == 16 and data["step"] == 5
    assert samples.pos.seen == 0 and samples.pos.values == []
    small = SimilaritySamples(capacity=8)
    for _ in range(5):
        small.offer(img, img.clone(), torch.arange(8))
    assert small.pending_rows == 8 and len(small.pending) == 1


def test_gaussians_round_trip_through_json() -> None:
    """Invariant: the snapshot's statistics come back as the same Gaussians (what the plot
    command redraws from)."""
    stats = SimilarityStats()
    stats.add(stats_of(torch.rand(300) * 0.3 + 0.5, torch.rand(600) * 0.3))
    g = stats.gaussians()
    back = gaussians_from_dict(json.loads(json.dumps(gaussians_to_dict(g))))
    for key in ("mu_pos", "var_pos", "mu_neg", "var_neg", "n_pos", "gate_open", "has_mu_pos"):
        assert torch.equal(getattr(back, key).to(getattr(g, key)), getattr(g, key)), key


def _snapshot() -> dict:
    g = {"mu_pos": 0.6, "var_pos": 0.01, "mu_neg": 0.3, "var_neg": 0.02, "n_pos": 500.0}
    gen = torch.Generator().manual_seed(0)
    return {
        "step": 40,
        "gaussians": {
            **g,
            "has_mu_pos": True,
            "gate_open": True,
            "variance": "separate",
            "prior": None,
        },
        "pos": (torch.randn(400, generator=gen) * 0.1 + 0.6).tolist(),
        "neg": (torch.randn(800, generator=gen) * 0.14 + 0.3).tolist(),
        "pos_seen": 400,
        "neg_seen": 800,
    }


def test_curves_agree_with_the_reference_sampler() -> None:
    """Invariant: the drawn P_fn(s) and w(s) are the paper's, one candidate at a time
    (``fne.reference``): the picture shows what the sampler does, at every grid point."""
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml").fne
    data = _snapshot()
    curves = fne_curves(data, cfg)
    g = data["gaussians"]
    rg = ref.Gaussians(g["mu_pos"], g["var_pos"], g["mu_neg"], g["var_neg"], int(g["n_pos"]))
    kw = {"eps": cfg.eps, "tau": cfg.tau_kernel, "margin": cfg.cut_margin, "prior": cfg.prior}
    c = ref.Constants(gate=cfg.gate_size, **kw)
    w_ref = [ref.weight(s, g["mu_pos"], False, rg, c) for s in curves["s"]]
    top = max(w_ref)
    for s, p, w, wr in zip(curves["s"], curves["p_fn"], curves["w"], w_ref, strict=True):
        assert p == pytest.approx(ref.p_fn(s, rg, cfg.prior), abs=1e-9)
        assert w == pytest.approx(wr / top, abs=1e-9)
    assert curves["w"][0] == 0.0  # s = −1 lies below the hard cut μ⁺ − m


def test_samples_per_second_from_log_times() -> None:
    """Invariant: samples/s between log lines is Δ micro steps × samples per micro step / Δt;
    lines without a time (older logs) are skipped, not guessed."""
    log = [{"step": 5, "time": 100.0}, {"step": 6}, {"step": 10, "time": 102.0},
           {"step": 15, "time": 107.0}]  # fmt: skip
    assert samples_per_second(log, 32) == ([10, 15], [80.0, 32.0])


def _fake_run(run_dir: Path) -> None:
    """A run directory with the files `python -m fne_dist.plot` reads (no training)."""
    run_dir.mkdir(parents=True)
    save_config(load_config(ROOT / "tests" / "configs" / "tiny.yaml"), run_dir / "config.yaml")
    rows = []
    for i in range(1, 21):
        loss = 0.4 / math.sqrt(i)
        per_direction = {"loss_i2t": loss / 2, "loss_t2i": loss / 2}
        rows.append({"step": 5 * i, "time": 10.0 + i, "loss": loss, **per_direction,
                     "frac_pfn_gt_eps": 0.01 * i, "grad_norm": 3.0 / i})  # fmt: skip
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = [{"step": s, "val": {"rsum": 10.0 + s}} for s in (5, 10, 15)]
    metrics = {"val": {"rsum": 30.0}, "test": {"rsum": 28.0}, "steps": 20, "world_size": 2,
               "history": history}  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    write_snapshot(run_dir / "plots", _snapshot())


def test_plot_command_draws_every_picture_and_again_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: `python -m fne_dist.plot RUN_DIR` writes a valid, non-trivial PNG per
    evaluation snapshot and training.png, names them, and a second call reproduces the same
    bytes (the pictures are a function of the run's files)."""
    run = tmp_path / "run"
    _fake_run(run)
    assert main([str(run)]) == 0
    names = {Path(line.split(" (")[0]).name for line in capsys.readouterr().out.splitlines()}
    assert names == {"fne-step-00000040.png", "training.png"}
    first = {p.name: p.read_bytes() for p in (run / "plots").glob("*.png")}
    for name in first:
        assert_png(run / "plots" / name)
    (run / "plots" / "training.png").unlink(missing_ok=True)
    assert main([str(run)]) == 0
    assert {p.name: p.read_bytes() for p in (run / "plots").glob("*.png")} == first


def test_plot_command_refuses_a_directory_that_is_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a directory without the run's files fails with one line naming the file."""
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no config.yaml" in err


def test_picture_before_any_statistics(tmp_path: Path) -> None:
    """Invariant: the first evaluation can come before any positive sample (NaN means, no
    samples): the picture is still drawn (axes and curves at μ⁺ = 0), not an error."""
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml").fne
    g = gaussians_to_dict(SimilarityStats().gaussians())
    data = {"step": 1, "gaussians": g, "pos": [], "neg": [], "pos_seen": 0, "neg_seen": 0}
    assert_png(draw_fne(data, cfg, tmp_path / "first.png"), min_bytes=10_000)
