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
    assert lines[1].startswith("[rank 3] step 1/2 ") and lines[1].endswith("loss=0.5")
    assert lines[2] == "[rank 3] shard a.tar ends early"
    assert len(lines) == 3 and err == ""


def test_the_null_reporter_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: ranks other than 0 get the null reporter: their reporter messages are not
    shown (only rank 0 reports the run; warnings of any rank still are)."""
    setup_logging()
    capsys.readouterr()
    Reporter().message("not shown")
    assert capsys.readouterr() == ("", "")
