"""Pictures of a run, written into ``RUN_DIR/plots``:

* ``fne-step-<step>.png`` at each evaluation: histograms of the positive and negative
  similarities sampled since the previous evaluation (``monitoring.similarities``) with the
  fitted Gaussians, and below them the false-negative posterior P_fn(s) and the sampling
  weight w(s) of a candidate for an anchor whose positive scores s⁺ = μ⁺, at the statistics of
  that moment. The curves come from ``fne.fn_posterior`` and ``fne.sampling_weights`` (the
  functions the loss uses), never from a second copy of the formulas.
* ``training.png`` at the end: loss (total and per direction), rsum per split, the share of
  candidates with P_fn > ε, the gradient norm and samples/s over the steps.

``python -m fne_dist.plot RUN_DIR`` draws them again from ``train_log.jsonl``,
``metrics.json``, ``config.yaml`` and ``plots/fne-step-*.json``. matplotlib's Agg backend:
no display needed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, load_config
from .fne import AnchorSims, Candidates, FneConfig, SimilarityStats, fn_posterior, sampling_weights
from .fne.rules import FNE, WINDOW
from .monitoring.similarities import SimilaritySamples, gaussians_from_dict, write_snapshot

log = logging.getLogger("fne_dist")

PLOTS = "plots"  # the run directory's subdirectory
GRID = 401  # points of the curves over the similarity axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: clusters have no display
    import matplotlib.pyplot as plt

    return plt


def fne_curves(data: dict[str, Any], cfg: FneConfig) -> dict[str, list[float]]:
    """P_fn(s) and w(s) (normalised to max 1) over s in [-1, 1] at the snapshot's statistics,
    for an anchor whose positive similarity is μ⁺ (0 before any positive)."""
    g = gaussians_from_dict(data["gaussians"])
    s_N = torch.linspace(-1.0, 1.0, GRID, dtype=torch.float64)
    s_pos = float(g.mu_pos) if bool(g.has_mu_pos) and math.isfinite(float(g.mu_pos)) else 0.0
    rule = WINDOW if cfg.loss == "window" else FNE
    rows = AnchorSims.of(
        s_N[None, :],
        torch.tensor([s_pos], dtype=torch.float64),
        torch.zeros(1, GRID, dtype=torch.bool),
    )
    w_1N = sampling_weights(rows, g, cfg, rule=rule).w_BN
    top = float(w_1N.max())
    return {
        "s": s_N.tolist(),
        "p_fn": fn_posterior(s_N, g, cfg.prior).tolist(),
        "w": (w_1N[0] / top if top > 0 else w_1N[0]).tolist(),
    }


def _gauss_pdf(s: list[float], mu: float, var: float) -> list[float]:
    return [math.exp(-((x - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var) for x in s]


def draw_fne(data: dict[str, Any], cfg: FneConfig, path: Path) -> Path:
    """The evaluation picture of one snapshot (see the module docstring)."""
    plt = _pyplot()
    g, curves = data["gaussians"], fne_curves(data, cfg)
    s = curves["s"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    bins = [x / 50 for x in range(-50, 51)]
    for side, colour in (("pos", "tab:green"), ("neg", "tab:red")):
        if data[side]:
            top.hist(data[side], bins=bins, density=True, alpha=0.4, color=colour,
                     label=f"{side} samples ({data[f'{side}_seen']} seen)")  # fmt: skip
        mu, var = g[f"mu_{side}"], g[f"var_{side}"]
        # fitted only from 2 positives on (n⁻ = 2 n⁺): before, μ/σ are placeholders (the floor)
        if g["n_pos"] >= 2 and math.isfinite(mu) and math.isfinite(var) and var > 0:
            label = f"N({mu:.3f}, {math.sqrt(var):.3f}²)"
            top.plot(s, _gauss_pdf(s, mu, var), color=colour, label=label)
    gate = "open" if g["gate_open"] else "closed"
    top.set_title(f"step {data['step']}: similarities, n+ = {g['n_pos']:.0f}, gate {gate}")
    top.set_ylabel("density")
    if top.get_legend_handles_labels()[0]:  # nothing to name before any sample
        top.legend(loc="upper left", fontsize=8)
    bottom.plot(s, curves["w"], color="tab:blue", label="sampling weight w(s) / max, s⁺ = μ⁺")
    if g["has_mu_pos"] and cfg.hard_cut and math.isfinite(g["mu_pos"]):
        bottom.axvline(g["mu_pos"] - cfg.cut_margin, color="grey", ls="--", label="hard cut")
    bottom.set_xlabel("cosine similarity s")
    bottom.set_ylim(-0.02, 1.05)
    bottom.legend(loc="upper left", fontsize=8)
    # P_fn spans many decades (π = 1e-4): its own log axis, with ε where the FN weight starts
    right = bottom.twinx()
    right.semilogy(s, [max(p, 1e-12) for p in curves["p_fn"]], color="tab:purple")
    right.axhline(cfg.eps, color="tab:purple", ls=":", lw=0.8)
    right.set_ylim(1e-12, 2.0)
    right.set_ylabel(f"P_fn(s) (log; dotted: ε = {cfg.eps:g})", color="tab:purple")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(log: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in log if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def samples_per_second(log: list[dict], samples_per_micro: int) -> tuple[list[int], list[float]]:
    """Between consecutive log lines: (Δ micro steps × samples per micro step) / Δ time."""
    timed = [r for r in log if "time" in r]
    steps, rates = [], []
    for a, b in itertools.pairwise(timed):
        dt = b["time"] - a["time"]
        if dt > 0 and b["step"] > a["step"]:
            steps.append(b["step"])
            rates.append((b["step"] - a["step"]) * samples_per_micro / dt)
    return steps, rates


def draw_training(log: list[dict], metrics: dict, samples_per_micro: int, path: Path) -> Path:
    """The end-of-run curves (x: micro step as in train_log.jsonl; rsum at optimizer steps)."""
    plt = _pyplot()
    fig, axes = plt.subplots(5, 1, figsize=(8, 12), sharex=False)
    for key in ("loss", "loss_i2t", "loss_t2i"):
        axes[0].plot(*_series(log, key), label=key)
    axes[0].set_ylabel("loss")
    evals = [h for h in metrics.get("history", []) if "val" in h]
    axes[1].plot([h["step"] for h in evals], [h["val"]["rsum"] for h in evals], "o-", label="val")
    for split in ("val", "test"):
        if split in metrics:
            axes[1].plot([metrics["steps"]], [metrics[split]["rsum"]], "s", label=f"{split} final")
    axes[1].set_ylabel("rsum (optimizer step)")
    axes[2].plot(*_series(log, "frac_pfn_gt_eps"), label="share of candidates with P_fn > ε")
    axes[3].plot(*_series(log, "grad_norm"), label="gradient norm (before clipping)")
    axes[4].plot(*samples_per_second(log, samples_per_micro), label="samples/s (all ranks)")
    axes[4].set_xlabel("micro step")
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class RunFileError(ValueError):
    """A run directory's file that is not what a run writes (one line naming the file)."""


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    """A JSON number, or null (the run's metrics write a non-finite value as null)."""
    return x is None or _real(x)


def _has_rsum(x: Any) -> bool:
    return isinstance(x, dict) and "rsum" in x and _number(x["rsum"])


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RunFileError(f"{path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise RunFileError(f"{path}: not JSON ({str(err).splitlines()[0]})") from None


def _metrics_problem(doc: Any) -> str | None:
    """What keeps ``doc`` from being a run's metrics.json as the pictures read it, or None."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    if not _int(doc.get("world_size", 1)) or doc.get("world_size", 1) < 1:
        return f"world_size is {doc['world_size']!r}, not a positive integer"
    for split in ("val", "test"):
        if split in doc and not (_has_rsum(doc[split]) and _int(doc.get("steps"))):
            return f"'{split}' needs an rsum number and 'steps' an integer"
    history = doc.get("history", [])
    if not isinstance(history, list):
        return "'history' is not a list"
    for i, h in enumerate(history):
        if not isinstance(h, dict) or (
            "val" in h and not (_has_rsum(h["val"]) and _int(h.get("step")))
        ):
            return f"history[{i}] is not an object with an integer step and val.rsum"
    return None


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's metrics.json, checked to have the shape the pictures read."""
    path = run_dir / "metrics.json"
    doc = _load_json(path)
    problem = _metrics_problem(doc)
    if problem:
        raise RunFileError(f"{path}: {problem}")
    return doc


def read_log(run_dir: Path) -> list[dict]:
    """The records of train_log.jsonl. A last line that is not JSON is the one a killed run
    was writing: skipped, as the loop does on resume; any other bad line is an error."""
    path = run_dir / "train_log.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise RunFileError(f"{path}: cannot read it ({err.strerror or err})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            if n == lines[-1][0]:
                log.warning("%s: line %d is cut short (a killed run): skipped", path, n)
                continue
            raise RunFileError(f"{path}: line {n} is not JSON") from None
        if not (isinstance(doc, dict) and _int(doc.get("step"))) or (
            "time" in doc and not _real(doc["time"])
        ):
            raise RunFileError(f"{path}: line {n} is not a log record (integer step, time)")
        records.append(doc)
    return records


SNAPSHOT_KEYS = ("step", "gaussians", "pos", "neg", "pos_seen", "neg_seen")
GAUSSIAN_NUMBERS = ("mu_pos", "var_pos", "mu_neg", "var_neg", "n_pos")
GAUSSIAN_FLAGS = ("has_mu_pos", "gate_open")


def read_snapshot(path: Path) -> dict[str, Any]:
    """One ``fne-step-*.json``, checked to hold what ``draw_fne`` reads."""
    data = _load_json(path)
    ok = (
        isinstance(data, dict)
        and all(k in data for k in SNAPSHOT_KEYS)
        and isinstance(data["gaussians"], dict)
        and all(_real(data["gaussians"].get(k)) for k in GAUSSIAN_NUMBERS)
        and all(isinstance(data["gaussians"].get(k), bool) for k in GAUSSIAN_FLAGS)
        and "variance" in data["gaussians"]
        and all(isinstance(data[k], list) and all(map(_real, data[k])) for k in ("pos", "neg"))
    )
    if not ok:
        raise RunFileError(f"{path}: not an FNE snapshot ({', '.join(SNAPSHOT_KEYS)})")
    return data


def plot_snapshot(snapshot: Path, cfg: Config) -> Path:
    """The PNG next to one ``fne-step-*.json``."""
    return draw_fne(read_snapshot(snapshot), cfg.fne, snapshot.with_suffix(".png"))


def plot_training(run_dir: Path, cfg: Config) -> Path:
    metrics = read_metrics(run_dir)
    per_micro = cfg.train.batch_size * int(metrics.get("world_size", 1))
    out = run_dir / PLOTS
    out.mkdir(exist_ok=True)
    return draw_training(read_log(run_dir), metrics, per_micro, out / "training.png")


def plot_run(run_dir: Path) -> list[Path]:
    """Every picture of a finished run, drawn again from its files; returns their paths."""
    cfg = load_config(run_dir / "config.yaml")
    pngs = [plot_snapshot(p, cfg) for p in sorted((run_dir / PLOTS).glob("fne-step-*.json"))]
    return [*pngs, plot_training(run_dir, cfg)]


class RunPictures:
    """Rank 0's pictures during a run: the loop offers each step's gathered block, samples it
    at log windows, and asks for a picture at each evaluation and at the end. A picture that
    fails to draw is a warning, never the end of a training run."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.dir, self.cfg = run_dir / PLOTS, cfg
        self.samples = SimilaritySamples(seed=cfg.run.seed)
        self.files: list[Path] = []
        self.last_step = -1  # the final evaluation may fall on the last periodic one's step

    def offer(self, gathered: Candidates) -> None:
        self.samples.offer(gathered.img_ND, gathered.txt_ND, gathered.ids_N)

    def sample(self) -> None:
        self.samples.sample()

    def evaluation(self, step: int, stats: SimilarityStats) -> None:
        if step == self.last_step:
            return
        self.last_step = step
        f = self.cfg.fne
        g = stats.gaussians(f.gate_size, f.var_floor, f.variance)
        snapshot = write_snapshot(self.dir, self.samples.snapshot(step, g))
        self._draw(lambda: plot_snapshot(snapshot, self.cfg))

    def finish(self, run_dir: Path) -> list[Path]:
        """training.png (after metrics.json is written); every picture of the run."""
        self._draw(lambda: plot_training(run_dir, self.cfg))
        return self.files

    def _draw(self, draw: Callable[[], Path]) -> None:
        try:
            self.files.append(draw())
        except Exception as err:  # a side channel: the run's results matter more
            log.warning("could not draw a picture: %s", str(err).splitlines()[0] if err else err)


class NoPictures(RunPictures):
    """Ranks other than 0: nothing sampled, nothing drawn."""

    def __init__(self) -> None:
        self.files = []

    def offer(self, gathered: Candidates) -> None:
        pass

    def sample(self) -> None:
        pass

    def evaluation(self, step: int, stats: SimilarityStats) -> None:
        pass

    def finish(self, run_dir: Path) -> list[Path]:
        return []


HELP = """\
Draw the pictures of a run again into RUN_DIR/plots (training writes them as it goes):
training.png (loss per direction, rsum per split, the false-negative share, gradient norm and
samples/s over the steps) and, at each evaluation, fne-step-STEP.png (the positive and
negative similarity histograms with their fitted Gaussians, the false-negative posterior and
the sampling weight). No display needed."""

EXAMPLES = """\
examples:
  %(prog)s runs/ref-1

exit status: 0 done; 2 not a finished run directory, or the pictures cannot be written."""


def build_parser(prog: str = "python -m fne_dist.plot") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory (run.output_dir/run.name)"
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m fne_dist.plot") -> int:
    args = build_parser(prog).parse_args(argv)
    for name in ("config.yaml", "metrics.json", "train_log.jsonl"):
        if not (args.run_dir / name).is_file():
            sys.stderr.write(f"{args.run_dir}: no {name} (not a finished run directory)\n")
            return 2
    try:
        paths = plot_run(args.run_dir)
    except (ConfigError, RunFileError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except OSError as err:  # the pictures cannot be written (a read-only or full disk)
        where = err.filename or args.run_dir / PLOTS
        sys.stderr.write(f"error: cannot write {where} ({err.strerror or err})\n")
        return 2
    for path in paths:
        sys.stdout.write(f"{path} ({path.stat().st_size} bytes)\n")  # the command's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
