"""The main job end to end, and the user errors it must report before training starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fne_dist.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # a plain single-process run, whatever launched pytest; MASTER_* too, which an in-process
    # test's process group leaves in os.environ: each run picks its own free port, so runs
    # side by side never meet at one
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                "MASTER_ADDR", "MASTER_PORT"):  # fmt: skip
        env.pop(var, None)
    return env


@pytest.mark.slow
@pytest.mark.system
@pytest.mark.timeout(600)
def test_tiny_run_trains_evaluates_and_writes_run_dir(tmp_path: Path) -> None:
    """Invariant: `python -m fne_dist.train` trains through DeepSpeed (warm-up then FNE with the
    memory), evaluates on val and test, prints the summary and one short progress line per log
    window, and leaves a run directory whose weights `python -m fne_dist.evaluate` turns into
    the same test metrics, and whose TensorBoard events hold the series of train_log.jsonl."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fne_dist.train",
            "--config",
            str(TINY),
            f"run.output_dir={tmp_path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "run.pictures=true",
            "report.tensorboard=true",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "tiny"
    assert {"config.yaml", "metrics.json", "model.safetensors", "train_log.jsonl"} <= {
        p.name for p in run.iterdir()
    }
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] > 3  # past the warm-up: the configured loss ran
    assert any(h.get("warmup") == 0.0 and "frac_pfn_gt_eps" in h for h in metrics["history"])
    assert any("val" in h for h in metrics["history"])  # periodic evaluation happened
    test = metrics["test"]
    assert 0 <= test["rsum"] <= 600 and test["group_rsum"] >= test["rsum"] - 1e-9
    assert "rsum" in out.stdout and "gate" in out.stdout and "wall time" in out.stdout
    assert load_file(str(run / "model.safetensors"))
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in log)  # DeepSpeed ZeRO 0 fp32 keeps its clip norm
    _check_pictures(run, out.stdout)
    _check_tensorboard(run, log)
    _check_progress_lines(out.stdout, log)

    again = subprocess.run(
        [sys.executable, "-m", "fne_dist.evaluate", str(run)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    recomputed = json.loads(again.stdout)
    for key in ("rsum", "group_rsum", "i2t_r1", "t2i_r10"):
        assert recomputed[key] == pytest.approx(test[key], abs=1e-6), key


def _check_tensorboard(run: Path, log: list[dict]) -> None:
    """report.tensorboard: the event file under the run directory, read back with
    TensorBoard's own reader, has one scalar series per numeric key of train_log.jsonl with the
    same steps and values (a null there is NaN here), and the evaluations as val/ and test/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    logged = {k for r in log for k, v in r.items() if k not in ("step", "time")}
    assert logged <= tags, logged - tags
    assert {"val/rsum", "test/rsum", "test/group_rsum"} <= tags, tags
    for key in logged:
        expected = [(r["step"], r[key]) for r in log if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        for (_, want), (_, have) in zip(expected, got, strict=True):
            assert have != have if want is None else have == pytest.approx(want, rel=1e-6), key


def _check_progress_lines(stdout: str, log: list[dict]) -> None:
    """The console: one progress line per log window (rank 0), short, with the step, epoch,
    losses of both directions, lr, samples/s and the time left; the FNE part once the FNE loss
    runs; no key=value dump of the window."""
    total = log[-1]["step"]
    lines = [line for line in stdout.splitlines() if line.startswith("[rank 0] step ")]
    lines = [line for line in lines if " | epoch " in line]
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [r["step"] for r in log]
    for line in lines:
        for part in ("| loss ", "(i2t ", ", t2i ", "| lr ", " samples/s |", f"/{total} |"):
            assert part in line, (part, line)
        assert "=" not in line and len(line) < 200, line
    assert "| FNE gate " in lines[-1] and "P_fn>eps" in lines[-1], lines[-1]
    assert all("| ETA " in line for line in lines[:-1]) and " samples/s | done" in lines[-1]


def _check_pictures(run: Path, stdout: str) -> None:
    """The run's pictures: one per evaluation and training.png, valid PNGs
    of non-trivial size, named in the summary, and `python -m fne_dist.plot` redraws the
    same bytes from the run's files."""
    pngs = sorted((run / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert "training.png" in names and any(n.startswith("fne-step-") for n in names), names
    summary = next(line for line in stdout.splitlines() if "pictures in" in line)
    assert all(name in summary for name in names), summary
    drawn = {p.name: p.read_bytes() for p in pngs}
    for name, data in drawn.items():
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, (name, len(data))
        (run / "plots" / name).unlink()
    again = subprocess.run(
        [sys.executable, "-m", "fne_dist.plot", str(run)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (run / "plots").glob("*.png")} == drawn


def _fails_with(capsys: pytest.CaptureFixture[str], args: list[str], *needles: str) -> None:
    assert main(["--config", str(TINY), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    for needle in needles:
        assert needle in err


def test_missing_shard_path_fails_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: a shard pattern matching nothing fails with one line naming the config key."""
    _fails_with(capsys, ["data.val=/nonexistent/val-*.tar"], "data.val", "/nonexistent/val-*.tar")


def test_empty_shard_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a shard without samples is named in a one-line error."""
    empty = tmp_path / "empty-000000.tar"
    with tarfile.open(empty, "w"):
        pass
    _fails_with(
        capsys,
        [f"data.train={empty}", f"run.output_dir={tmp_path}"],
        "data.train",
        "contain no samples",
    )


def test_unknown_encoder_fails_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: an encoder that is not installed offline is refused by name."""
    _fails_with(
        capsys,
        ["model.text.name_or_path=bert-base-uncased"],
        "not available offline: bert-base-uncased",
    )


def test_out_of_range_value_fails_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: an out-of-range value names its key."""
    _fails_with(capsys, ["memory.momentum=1.5"], "memory.momentum", "<= 1.0")


# Every loss of fne.loss, and every posterior with the fne loss, on the tiny config with the
# default run's fne section (tiny.yaml pins the paper's estimator for its launch tests, so
# the paper's posterior trains in test_tiny_run_trains_evaluates_and_writes_run_dir).
DEFAULT_FNE = [
    "fne.posterior=intra_mixture",
    "fne.stats_source=all_pairs",
    "fne.fallback=unflagged",
    "fne.eps=0.5",
    "fne.tau_fn=4.0",
]
RUNS = {
    **{
        f"loss_{loss}": [f"fne.loss={loss}"]
        for loss in ("fne", "window", "vse_pp", "vse0", "infonce", "fne_sum")
    },
    "posterior_cross_mixture": ["fne.loss=fne", "fne.posterior=cross_mixture"],
}


CONCURRENT_RUNS = 2  # one per core: each run pins run.threads=1


@pytest.fixture(scope="module")
def every_loss_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """(exit status, stderr tail, run directory) of each entry of ``RUNS``, each its own
    `python -m fne_dist.train` process (a process holds one distributed rendezvous), run
    ``CONCURRENT_RUNS`` at a time so the set costs about what its longest pair costs."""
    pending, running, done = list(RUNS), [], {}
    while pending or running:
        while pending and len(running) < CONCURRENT_RUNS:
            name = pending.pop(0)
            out = tmp_path_factory.mktemp(name)
            cmd = [
                sys.executable, "-m", "fne_dist.train", "--config", str(TINY),
                f"run.output_dir={out}", f"data.cache_dir={out / 'cache'}", "run.threads=1",
                "train.epochs=0.05", "train.eval_every=0", *DEFAULT_FNE, *RUNS[name],
            ]  # fmt: skip
            err = (out / "stderr.txt").open("w")
            proc = subprocess.Popen(
                cmd, cwd=out, env=_env(), stdout=subprocess.DEVNULL, stderr=err, text=True
            )
            running.append((name, proc, out, err))
        name, proc, out, err = running.pop(0)
        proc.wait(timeout=900)
        err.close()
        done[name] = (proc.returncode, (out / "stderr.txt").read_text()[-3000:], out / "tiny")
    return done


@pytest.mark.slow
@pytest.mark.system
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", list(RUNS))
def test_every_loss_and_posterior_trains_from_the_default_fne_section(
    every_loss_run: dict[str, tuple[int, str, Path]], name: str
) -> None:
    """Invariant: switching fne.loss alone on the default fne section is a valid config (the
    FNE sampler's settings are ignored by losses without one), and every loss and every
    posterior trains past the warm-up through `python -m fne_dist.train`, logs a window (whose
    means must all be scalars: infonce's temperature is one), and evaluates."""
    status, stderr, run_dir = every_loss_run[name]
    assert status == 0, stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(h.get("warmup") == 0.0 for h in metrics["history"])  # past the warm-up
    assert 0 <= metrics["test"]["rsum"] <= 600
