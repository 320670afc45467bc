"""One logging path: the run's messages, the console reporter and the data stream's warnings
go through the ``fne_dist`` logger's one handler, with the rank in front."""

from __future__ import annotations

import logging

import pytest

from fne_dist.reporters import ConsoleReporter, FanOut, Reporter, setup_logging


def test_reporter_and_data_stream_share_one_rank_prefixed_handler(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: after setup_logging (called twice, as a second run in one process does),
    a reporter message, a console step line and a ``fne_dist.data`` warning each appear once,
    on stdout, as "[rank r] ..." with the launcher's rank; nothing goes to stderr."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    setup_logging()
    setup_logging()
    console = ConsoleReporter(total_steps=2, samples_per_step=8, every=1)
    reporter = FanOut(Reporter(), console)
    capsys.readouterr()
    reporter.message("hello 100%")
    reporter.step(0, {"loss": 0.5})
    logging.getLogger("fne_dist.data").warning("shard %s ends early", "a.tar")
    console.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "[rank 3] hello 100%"
    assert lines[1].startswith("[rank 3] step 1/2 | ") and "loss 0.5000" in lines[1]
    assert lines[2] == "[rank 3] shard a.tar ends early"
    assert len(lines) == 3 and err == ""


def test_the_null_reporter_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: ranks other than 0 get the null reporter: their reporter messages are not
    shown (only rank 0 reports the run; warnings of any rank still are)."""
    setup_logging()
    capsys.readouterr()
    Reporter().message("not shown")
    assert capsys.readouterr() == ("", "")


# A log window's metrics as the loop reports them (from a 2-worker run of the tiny config).
WINDOW = {
    "loss": 0.4657, "loss_i2t": 0.2571, "loss_t2i": 0.2086, "fallback": 0.0,
    "no_violator": 0.0, "frac_zero_hinge": 0.03125, "mean_neg_sim": 0.3023,
    "fnd_n_eval": 120.0, "fnd_rel0_p": 0.002145, "fnd_rel3_p": 0.0, "frac_pfn_gt_eps": 0.0125,
    "frac_in_window": 0.1959, "gate_open": 1.0, "n_pos": 1.0, "mu_pos": 0.1692,
    "sigma_pos": 0.01564, "mu_neg": 0.1604, "sigma_neg": 0.01909, "epoch": 2,
    "lr": 0.0008536, "warmup": 0.0, "skipped_nonfinite": 0, "grad_norm": 1.548,
}  # fmt: skip


def _window_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, full: bool
) -> list[str]:
    """The console lines of steps 41..60 of 100 (resumed after 40), 2 s per step, every 10."""
    clock = iter(float(t) for t in range(0, 1000, 2))
    monkeypatch.setattr("fne_dist.reporters.time.perf_counter", lambda: next(clock))
    setup_logging()
    console = ConsoleReporter(total_steps=100, samples_per_step=16, every=10, full=full)
    console.resumed(40)
    capsys.readouterr()
    for step in range(40, 60):
        console.step(step, WINDOW)
    console.close()
    return capsys.readouterr().out.splitlines()


def test_progress_line_shows_what_a_person_watches(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: each log window prints one short line: step/total, epoch, the loss and its
    two directions, lr, samples/s of this process's own steps (a resumed run's earlier steps
    do not count), the time left, and the FNE gate with the shares of candidates it treats;
    no other metric (they are in train_log.jsonl, Prometheus and TensorBoard)."""
    lines = _window_lines(capsys, monkeypatch, full=False)
    assert len(lines) == 2
    # the clock advances 2 s per reading (construction, then each step): step 50 is 10 steps
    # after the resume and 20 s in, 16 × 10 / 20 = 8 samples/s; 50 steps left at 2 s: "2 min"
    assert lines[0] == (
        "[rank 0] step 50/100 | epoch 2 | loss 0.4657 (i2t 0.2571, t2i 0.2086) | lr 8.54e-04 "
        "| 8 samples/s | ETA 2 min | FNE gate open, P_fn>eps 1.2%, window 19.6%"
    )
    assert lines[1].startswith("[rank 0] step 60/100 |")
    assert "=" not in lines[0] and "fnd_" not in lines[0] and "grad_norm" not in lines[0]


def test_verbose_progress_line_shows_every_metric(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: with report.console=full (``-v``) the line carries every logged metric as
    key=value, as before the short line existed."""
    lines = _window_lines(capsys, monkeypatch, full=True)
    assert len(lines) == 2
    assert lines[0].startswith("[rank 0] step 50/100 8 samples/s loss=0.4657 ")
    assert all(f" {key}=" in lines[0] for key in WINDOW)


def test_short_line_without_fne_and_with_skipped_steps() -> None:
    """Invariant: a loss without the FNE statistics (vse_pp, the warm-up) shows no FNE part;
    a non-finite loss shows as nan and the skipped steps are counted; the last window says
    done instead of a time left."""
    from fne_dist.reporters import short_line

    line = short_line(
        10, 10, 5.0, 0.0, {"loss": float("nan"), "lr": 1e-3, "warmup": 1.0, "skipped_nonfinite": 2}
    )
    assert line == (
        "step 10/10 | epoch 0 | loss nan | lr 1.00e-03 warm-up | 5 samples/s | done "
        "| 2 non-finite steps skipped"
    )


def test_ray_report_lines_are_dropped_except_rank_0_verbose() -> None:
    """Invariant: Ray Train's per-report ``Reporting training result N: TrainingReport(...)``
    and ``Checkpoint successfully created at: ...`` lines are dropped on the handlers of every
    worker's root and ``ray.train`` loggers; with report.console=full rank 0 keeps them (other
    ranks never do); every other record passes."""
    from fne_dist.config import load_config
    from fne_dist.distributed.ray_launcher import RayReportLines, quiet_ray_reports

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("/x/context.py", logging.INFO, "x", 1, msg, None, None)

    report = record("Reporting training result 3: TrainingReport(metrics={'loss': 1.0})")
    saved = record("Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)")
    other = record("Checkpoint x could not be deleted")
    assert not RayReportLines(keep=False).filter(report)
    assert not RayReportLines(keep=False).filter(saved)
    assert RayReportLines(keep=False).filter(other)
    handlers = {"": logging.StreamHandler(), "ray.train": logging.StreamHandler()}
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    try:
        for console, rank, kept in (("short", 0, False), ("full", 1, False), ("full", 0, True)):
            cfg = load_config(None, [f"report.console={console}"])
            for handler in handlers.values():
                handler.filters.clear()
            quiet_ray_reports(cfg, rank)
            quiet_ray_reports(cfg, rank)  # a second run in the same worker: one filter
            for handler in handlers.values():
                assert len(handler.filters) == 1
                assert bool(handler.filter(report)) == kept == bool(handler.filter(saved))
                assert handler.filter(other)
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
