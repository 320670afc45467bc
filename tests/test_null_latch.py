"""``fne.mixture_null_latch`` (fne_dist/fne/null_mixture.py ``latch_step``): the null-mixture
choice of ``fne.mixture_null_auto`` latches to the J-component null after that many tail steps in
a row. Its rule is held equal to a plain loop; a latched run keeps the J-component fit when the
histogram turns bump-like (the late flip it exists for); the state rides with the step's sums,
warm-up steps leave it, and a resume from the statistics' state_dict continues bit for bit."""

from __future__ import annotations

import io
import random

import torch

from fne_dist.fne import FneConfig, SimilarityStats, gaussians_from_stats, stats_of
from fne_dist.fne.mixture import histogram
from fne_dist.fne.null_mixture import LATCH_STATE, is_tail, latch_step, select_null_fit
from fne_dist.fne.posteriors import posterior_for
from fne_dist.fne.stats import POSTERIOR_STATE, with_posterior_state

F64 = torch.float64


def _reference_latch(tails: list[bool], steps: int) -> tuple[list[bool], bool, int]:
    """The rule one step at a time in plain Python: (each step's choice, latched, run)."""
    latched, run, used = False, 0, []
    for tail in tails:
        if not latched:  # a latched run's count stays where it latched
            run = run + 1 if tail else 0
        latched = latched or (steps > 0 and run >= steps)
        used.append(tail or latched)
    return used, latched, run


def test_latch_step_matches_a_plain_loop() -> None:
    """Invariant: ``latch_step`` iterated over any tail sequence gives the plain loop's choices
    and final state, for every window length (0: the per-step choice, never latched)."""
    rng = random.Random(0)
    for trial in range(60):
        steps = trial % 6
        tails = [rng.random() < rng.choice((0.3, 0.7, 0.95)) for _ in range(40)]
        want_used, want_latched, want_run = _reference_latch(tails, steps)
        state = torch.zeros(LATCH_STATE, dtype=F64)
        used = []
        for tail in tails:
            use, state = latch_step(state, torch.tensor(tail), steps)
            used.append(bool(use))
        assert used == want_used, (steps, tails)
        assert state.tolist() == [float(want_latched), float(want_run)]
    assert LATCH_STATE == POSTERIOR_STATE  # the statistics keep room for the whole state


def _hist(shape: str, seed: int) -> torch.Tensor:
    """A histogram shaped like the emoji's (a skewed null: the one-null fit takes its tail) or
    like bench/quality.py's ten classes (a wide false-negative bump)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(50_000, generator=gen, dtype=F64)
    z = torch.randn(50_000, generator=gen, dtype=F64)
    if shape == "tail":
        x = torch.where(
            u < 0.01, 0.88 + 0.06 * z, torch.where(u < 0.76, -0.02 + 0.13 * z, 0.2 + 0.2 * z)
        )
    else:
        x = torch.where(u < 0.1, 0.5 + 0.19 * z, -0.05 + 0.2 * z)
    x = x.clamp(-1.0, 1.0)
    return histogram(x, torch.ones_like(x, dtype=torch.bool))


def _run(hists: list[torch.Tensor], cfg: FneConfig, stats: SimilarityStats) -> list[float]:
    """The step's fit-and-commit order (fne_dist/step.py) on given histograms: each step's
    choice (the fit's ``frac_tail_intra``)."""
    posterior = posterior_for(cfg)
    g = gaussians_from_stats(stats_of(torch.zeros(0), torch.zeros(0)), 200, 1e-8, "separate")
    used = []
    for h in hists:
        batch = torch.cat([torch.zeros(6, dtype=F64), h])
        kept = stats.posterior_state
        seen = stats.with_step(with_posterior_state(batch, kept), cfg.mixture_decay)
        fit = posterior.fit(g, seen.posterior_totals, kept)
        used.append(float(fit.diagnostics()["frac_tail_intra"]))
        stats.add_step(with_posterior_state(batch, fit.state), cfg.mixture_decay)
    return used


def _cfg(latch: int) -> FneConfig:
    return FneConfig(
        posterior="intra_mixture",
        mixture_null_components=3,
        mixture_null_auto=True,
        mixture_null_latch=latch,
        mixture_decay=1e-3,  # the running histogram ≈ the step's: its shape is the test's choice
    )


def test_a_latched_choice_holds_when_the_histogram_turns_bump_like() -> None:
    """Invariant: after ``latch`` tail steps in a row the J-component null stays chosen on
    bump-like histograms, where the per-step choice (latch 0) goes back to the two-component
    fit; a run of bumps with fewer tail steps in a row than the window never latches."""
    tail, bump = _hist("tail", 1), _hist("bump", 2)
    assert bool(is_tail(tail)) and not bool(is_tail(bump))
    assert _run([tail, tail, bump], _cfg(2), SimilarityStats())[-1] == 1.0  # latched
    assert _run([tail, bump], _cfg(0), SimilarityStats())[-1] == 0.0  # per step: flipped back
    assert _run([tail, bump, tail, bump], _cfg(2), SimilarityStats())[-1] == 0.0
    m = select_null_fit(bump, 3, use_many=torch.tensor(True))
    assert float(m.tail) == 1.0  # the latched choice is the J-component fit, not the per-step


def test_latch_resumes_exactly_from_the_statistics_state() -> None:
    """Invariant (resume-exactness): a run checkpointed mid-window (one of two tail steps
    counted) and resumed from ``SimilarityStats.state_dict`` through torch.save makes the same
    choices and ends in the same state and histogram as the run without a stop; a resume that
    drops the state (an older checkpoint) does not, so the test can tell."""
    tail, bump = _hist("tail", 3), _hist("bump", 4)
    seq = [tail, tail, bump]
    whole = SimilarityStats()
    want = _run(seq, _cfg(2), whole)
    first = SimilarityStats()
    got = _run(seq[:1], _cfg(2), first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = SimilarityStats()
    resumed.load_state_dict(state)
    got += _run(seq[1:], _cfg(2), resumed)
    assert got == want and want[-1] == 1.0
    assert torch.equal(resumed.posterior_state, whole.posterior_state)
    assert torch.equal(resumed.posterior_totals, whole.posterior_totals)
    old = SimilarityStats()
    old.load_state_dict({k: v for k, v in state.items() if k != "posterior_state"})
    assert _run(seq[1:], _cfg(2), old)[-1] == 0.0  # one tail step counted: never latched


def test_the_step_commits_the_state_and_warm_up_leaves_it() -> None:
    """Invariant: ``forward_step``'s ``stat_sums`` carry ``latch_step`` of the committed
    histogram (every caller that commits the sums commits the state), except on warm-up
    steps, which leave it as it was; a posterior without state carries the kept one on."""
    from fne_dist.memory import MomentumMemory
    from fne_dist.model import DualEncoder, ModelConfig
    from fne_dist.momentum import make_momentum_copy
    from fne_dist.step import StepPosition, forward_step

    gen = torch.Generator().manual_seed(1)
    batch = {
        "img_feat": torch.randn(8, 6, generator=gen),
        "txt_feat": torch.randn(8, 6, generator=gen),
        "ids": torch.arange(8),
        "groups": torch.tensor([0, 0, 0, 1, 1, 2, 2, -1]),
    }
    for cfg in (_cfg(1), FneConfig(posterior="intra_mixture")):
        for warm in (True, False):
            torch.manual_seed(0)
            model = DualEncoder(None, None, 6, 6, ModelConfig(embed_dim=4, head="linear"))
            momentum, memory = make_momentum_copy(model), MomentumMemory(20, 4, seed=0)
            stats = SimilarityStats()
            kept = torch.tensor([0.0, 5.0], dtype=F64)  # five tail steps counted before
            stats.posterior_state = kept
            out = forward_step(model, momentum, batch, memory, stats, cfg, StepPosition(0, 0, warm))
            stats.add_step(out.stat_sums, cfg.mixture_decay)
            stateful = cfg.mixture_null_auto and not warm
            if stateful:
                _, want = latch_step(kept, is_tail(stats.posterior_totals), 1)
            else:
                want = kept
            assert torch.equal(stats.posterior_state, want), (cfg.mixture_null_auto, warm)
            assert stats.posterior_totals.numel() > 0


def test_the_host_shortcut_equals_the_accelerator_form(monkeypatch) -> None:
    """Invariant: on the CPU ``auto_null_fit`` computes only the chosen fit (and no tail test
    once latched); its mixture, choice and next state equal the accelerator form's (both fits
    and the tail test, picked by torch.where) bit for bit, latched or not, tail or bump."""
    from fne_dist.fne import host as host_module
    from fne_dist.fne.null_mixture import auto_null_fit

    hists = [_hist("tail", 5), _hist("bump", 6)]
    states = [torch.tensor(s, dtype=F64) for s in ([0.0, 0.0], [0.0, 1.0], [1.0, 2.0])]
    for h in hists:
        for state in states:
            host, host_next = auto_null_fit(h, 3, 1e-8, state, 2)
            with monkeypatch.context() as m:
                m.setattr(host_module, "on_host", lambda _t: False)
                dev, dev_next = auto_null_fit(h, 3, 1e-8, state, 2)
            for a, b in zip(
                (host.weights_K, host.mu_K, host.var_K, host.tail, host_next),
                (dev.weights_K, dev.mu_K, dev.var_K, dev.tail, dev_next),
                strict=True,
            ):
                assert torch.equal(a, b), (state.tolist(), a, b)
