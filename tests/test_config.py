"""Config: YAML + overrides, validated once; every error names the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fne_dist.config import ConfigError, config_to_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override, names",
    [
        ("fne.priorr=0.1", ["fne.priorr", "fne.prior"]),  # unknown key, with the close match
        ("fne.prior=2", ["fne.prior", "< 1.0"]),  # out of range
        ("fne.loss=triplet", ["fne.loss", "fne, window, vse_pp, vse0, infonce"]),  # choices
        ("memory.size=big", ["memory.size", "int"]),  # wrong type
        ("optim.milestones=[5, x]", ["optim.milestones[1]"]),
        ("fne.hard_cut=1", ["fne.hard_cut", "bool"]),
        ("nosection.x=1", ["nosection"]),
        ("fne.temperature=0.9", ["fne.temperature"]),  # cross-field rule
    ],
)
def test_errors_name_the_key(override: str, names: list[str]) -> None:
    """Invariant: a bad key, type or range fails at load with one line naming the key and the
    valid choices."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_overrides_and_yaml(tmp_path: Path) -> None:
    """Invariant: file values override defaults, command-line overrides override the file,
    scientific notation is a float, and the saved resolved config loads back identically."""
    path = tmp_path / "x.yaml"
    path.write_text("fne:\n  prior: 1e-3\n  loss: window\noptim:\n  milestones: [5, 15]\n")
    cfg = load_config(path, ["fne.loss=vse_pp", "optim.lr=3e-5", "fne.hard_cut_margin=null"])
    assert cfg.fne.prior == 1e-3 and cfg.fne.loss == "vse_pp" and cfg.optim.lr == 3e-5
    assert cfg.optim.milestones == [5, 15] and cfg.fne.hard_cut_margin is None
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_defaults_are_the_paper_values() -> None:
    """Invariant: library defaults are the reference values of fne-algorithm.md §1-4."""
    cfg = load_config()
    assert (cfg.fne.margin, cfg.fne.prior, cfg.fne.eps) == (0.2, 1e-4, 1e-3)
    assert (cfg.fne.tau_kernel, cfg.fne.tau_fn, cfg.fne.gate_size) == (0.5, 0.5, 200)
    assert cfg.fne.cut_margin == cfg.fne.margin and cfg.fne.negatives == 1
    assert (cfg.memory.size, cfg.memory.momentum) == (8224, 0.995)
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.run.seed) == (2e-5, 2.0, 3407)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fne: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    """Invariant: every config file in configs/ loads and validates."""
    load_config(path)
