"""``fne.posterior``: one estimator per class, chosen in one registry (fne_dist/fne/posteriors/):
the mixture posteriors on hand-made tensors with known answers and against plain forms written
here, the registry, and the one-line errors of retired options."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fne_dist.fne import Anchors, Candidates, FneConfig, Gaussians, retrieval_loss
from fne_dist.fne.mixture import Mixture, histogram
from fne_dist.fne.posteriors import POSTERIORS, PairSims, posterior_for
from fne_dist.fne.posteriors.cross_mixture import MixtureFit
from fne_dist.fne.posteriors.intra_mixture import IntraFit, log_likelihood_ratio

F64 = torch.float64


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def _gauss() -> Gaussians:
    one = _t(1.0)
    return Gaussians(_t(0.5), _t(0.01), _t(0.1), _t(0.01), one, torch.tensor(True),
                     torch.tensor(True))  # fmt: skip


CROSS = Mixture(_t(0.2), _t(0.4), _t(0.01), _t(0.0), _t(0.04))
INTRA = Mixture(_t(0.1), _t(0.7), _t(0.02), _t(0.2), _t(0.03))


def _density(v: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(mu, var.sqrt()).log_prob(v).exp()


def test_log_likelihood_ratio_is_the_ratio_of_densities() -> None:
    """Invariant: Λ(v) = log N(v; μ_f, σ_f²) − log N(v; μ_t, σ_t²), checked against
    torch.distributions densities."""
    v = torch.linspace(-0.5, 0.9, 15, dtype=F64)
    f, t = _density(v, INTRA.mu_fn, INTRA.var_fn), _density(v, INTRA.mu_tn, INTRA.var_tn)
    want = torch.log(f / t)
    torch.testing.assert_close(log_likelihood_ratio(v, INTRA), want)


def test_posterior_of_each_mixture_is_bayes_rule() -> None:
    """Invariant: sigmoid(L) is Bayes' rule with the fit's own prior: cross_mixture on the
    cross-modal similarity s, intra_mixture on the image-image similarity x of the pair."""
    s = torch.tensor([[0.1, 0.4], [0.3, -0.2]], dtype=F64)
    img_a = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64)
    img_c = torch.tensor([[0.2, 0.0], [0.8, 0.6]], dtype=F64)
    x = img_a @ img_c.T
    fc, tc = _density(s, CROSS.mu_fn, CROSS.var_fn), _density(s, CROSS.mu_tn, CROSS.var_tn)
    fi, ti = _density(x, INTRA.mu_fn, INTRA.var_fn), _density(x, INTRA.mu_tn, INTRA.var_tn)
    pc, pi = CROSS.prior, INTRA.prior
    pairs = PairSims(s, img_a, img_c)
    torch.testing.assert_close(
        MixtureFit(CROSS).log_odds(pairs).sigmoid(), pc * fc / (pc * fc + (1 - pc) * tc)
    )
    torch.testing.assert_close(
        IntraFit(INTRA).log_odds(pairs).sigmoid(), pi * fi / (pi * fi + (1 - pi) * ti)
    )
    assert MixtureFit(CROSS).quadratic and not IntraFit(INTRA).quadratic


def test_each_mixture_posterior_recovers_its_prior_from_its_histogram() -> None:
    """Invariant: a mixture posterior's fit of the running histogram of its signal recovers a
    known mixture's π and FN mean within 0.03 (well-separated components, 40,000 samples)."""
    gen = torch.Generator().manual_seed(0)
    n = 40_000

    def sample(prior: float, mu_f: float, mu_t: float) -> torch.Tensor:
        is_fn = torch.rand(n, generator=gen, dtype=F64) < prior
        v = torch.where(is_fn, mu_f, mu_t) + 0.08 * torch.randn(n, generator=gen, dtype=F64)
        return v.clamp(-1, 1)

    valid = torch.ones(n, dtype=torch.bool)
    for name, (prior, mu_f, mu_t) in {
        "cross_mixture": (0.3, 0.5, -0.1),
        "intra_mixture": (0.1, 0.8, 0.2),
    }.items():
        fit = posterior_for(FneConfig(posterior=name)).fit(
            _gauss(), histogram(sample(prior, mu_f, mu_t), valid)
        )
        m = fit.mixture  # type: ignore[attr-defined]
        assert abs(float(m.prior) - prior) < 0.03 and abs(float(m.mu_fn) - mu_f) < 0.03, name


def _pairs() -> tuple[Anchors, Candidates]:
    """Two anchors (ids 0, 1; groups 5, 6), four candidates: their own pairs, a group mate of
    anchor 0 whose image matches anchor 0's (id 2, group 5) and an unrelated one (id 3, group 7)."""
    e = torch.eye(4, dtype=F64)
    img = torch.stack([e[0], e[1], 0.9 * e[0] + 0.436 * e[2], e[3]])
    txt = torch.stack([e[0], e[1], e[2], e[3]])
    ids, groups = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 5, 7])
    a = Anchors(img[:2].clone(), txt[:2].clone(), ids[:2], torch.arange(2), groups[:2])
    return a, Candidates(img, txt, ids, 4, groups)


def test_sampler_weights_take_the_given_log_odds() -> None:
    """Invariant: with log-odds given (a posterior not a function of s) the FNE weight is
    exp(−τ_fn P_fn) where P_fn > ε (gate open) and the kernel exp(−τ_k (s − s⁺)²) elsewhere,
    zero at or below the hard cut μ⁺ − margin, whatever the quadratic in s would say."""
    from fne_dist.fne.weights import AnchorSims, sampling_weights

    g = _gauss()  # μ⁺ 0.5, cut at 0.3
    cfg = FneConfig(posterior="intra_mixture", eps=0.5, tau_fn=4.0, tau_kernel=0.5)
    sim = torch.tensor([[0.9, 0.45, 0.4, 0.2]], dtype=F64)  # column 0: the positive
    mask = torch.tensor([[True, False, False, False]])
    p = torch.tensor([[0.5, 0.95, 0.1, 0.99]], dtype=F64)
    w = sampling_weights(
        AnchorSims.of(sim, sim[:, 0], mask), g, cfg, log_odds_BN=torch.log(p / (1 - p))
    )
    want = [0.0, math.exp(-4.0 * 0.95), math.exp(-0.5 * 0.5**2), 0.0]
    torch.testing.assert_close(w.w_BN[0], torch.tensor(want, dtype=F64))
    assert w.n_fn_B.tolist() == [2]  # columns 1 and 3 (the cut does not matter for the count)


def test_fne_sampler_with_intra_signal_flags_the_image_matched_mate() -> None:
    """Invariant: the fne sampler with the intra_mixture posterior scores P_fn on the image-image
    similarity: the one group mate with a matching image is flagged in both directions
    (precision 1, recall 1), although its cross-modal similarity is 0."""
    a, c = _pairs()
    g = replace(_gauss(), posterior=IntraFit(INTRA), has_mu_pos=torch.tensor(False))
    cfg = FneConfig(posterior="intra_mixture", eps=0.5)
    uniforms = torch.full((2, 2, 1), 0.5, dtype=F64)
    out = retrieval_loss(a, c, cfg, g, uniforms)
    d = out.diagnostics
    assert d["fnd_pfn_pred"].item() == 2 and d["fnd_pfn_tp"].item() == 2
    assert d["fnd_n_actual"].item() == 2
    assert torch.isfinite(out.loss)


def test_registry_names_its_classes() -> None:
    """Invariant: fne.posterior's choices are the registry's names, each the name of its class
    (one place chooses the estimator)."""
    from fne_dist.config import field_choices
    from fne_dist.fne.params import FneConfig as Cfg

    assert tuple(POSTERIORS) == field_choices(Cfg, "posterior")  # the Literal of the field
    for name, cls in POSTERIORS.items():
        assert cls.name == name and isinstance(posterior_for(FneConfig(posterior=name)), cls)


SAMPLER = ("loss.py", "selection.py", "weights.py", "detection.py", "sampling.py")


def test_the_sampler_never_names_a_posterior() -> None:
    """Invariant: the sampler asks the fitted posterior (log-odds, ``quadratic``) and never
    compares its name: no posterior name appears as a string in the sampler's modules."""
    root = Path(__file__).resolve().parents[1] / "fne_dist" / "fne"
    for module in SAMPLER:
        text = (root / module).read_text()
        for name in POSTERIORS:
            assert not re.search(rf"[\"']{name}[\"']", text), (module, name)


@pytest.mark.parametrize(
    "key,value,replacement",
    [
        ("fn_model", "mixture", "fne.posterior"),
        ("fn_signal", "tail", "fne.posterior=intra_mixture"),
        ("prior_mode", "em", "fne.prior"),
        ("infonce_fn", "downweight", "fne.loss=infonce"),
        ("tail_z", 3.0, "fne.posterior=intra_mixture"),
    ],
)
def test_a_retired_option_fails_in_one_line_naming_its_replacement(
    key: str, value: object, replacement: str
) -> None:
    """Invariant: an old config naming a retired option fails at load with one line that says
    what replaced it (not "unknown key")."""
    from fne_dist.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as err:
        config_from_dict({"fne": {key: value}})
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"fne.{key}=") and replacement in line, line


@pytest.mark.parametrize("loss", ["fne", "window", "vse_pp", "vse0", "infonce"])
def test_switching_the_loss_on_the_default_config_is_valid(loss: str) -> None:
    """Invariant: the FNE sampler's settings of configs/default.yaml (a mixture posterior, the
    unflagged fallback) never make another loss unreachable: fne.loss alone switches it."""
    from fne_dist.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "default.yaml", [f"fne.loss={loss}"])
    assert cfg.fne.loss == loss and cfg.fne.posterior == "intra_mixture"


def test_infonce_diagnostics_are_scalars() -> None:
    """Invariant: every diagnostic of the infonce loss is 0-dim, also with the model's
    1-element temperature parameter (the log window stacks them)."""
    a, c = _pairs()
    out = retrieval_loss(a, c, FneConfig(loss="infonce"), temperature=torch.tensor([0.07]))
    assert all(v.dim() == 0 for v in out.diagnostics.values()), {
        k: v.shape for k, v in out.diagnostics.items()
    }


def test_intra_log_odds_in_slices_are_the_whole_formula_bit_for_bit() -> None:
    """Invariant: the intra posterior's log-odds, evaluated in cache-sized float64 slices and
    rounded to the similarities' float32, are the bits of the formula evaluated on the whole
    b×N matrix at once (a matrix of several slices, not a multiple of the slice), so slicing
    changes no weight and no draw."""
    from fne_dist.fne.posteriors.intra_mixture import ODDS_SLICE

    gen = torch.Generator().manual_seed(3)
    b, n = 3, ODDS_SLICE // 2 + 77
    img_a = torch.nn.functional.normalize(torch.randn(b, 16, generator=gen), dim=1)
    img_c = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
    pairs = PairSims(torch.zeros(b, n), img_a, img_c)
    m = INTRA
    whole = torch.log(m.prior) - torch.log1p(-m.prior) + log_likelihood_ratio(img_a @ img_c.T, m)
    got = IntraFit(m).log_odds(pairs)
    assert got.dtype == torch.float32 and torch.equal(got, whole.to(torch.float32))
    assert IntraFit.direction_free and not MixtureFit.direction_free
