"""Resuming with another memory.size or embed_dim: the checkpoint's memory
does not fit this run's; the mismatch is one CheckpointError line naming the setting and both
values (exit status 2 like a batch-size mismatch), found before any state is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from fne_dist.checkpoint.collective import Parts, load_run_checkpoint
from fne_dist.checkpoint.format import CheckpointError
from fne_dist.memory import MomentumMemory
from fne_dist.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


class _NoEngine:
    """An engine that must not be reached: the mismatch is found before any state loads."""

    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("engine state loaded despite a memory mismatch")


def _checkpoint_with_memory(path: Path, size: int, dim: int) -> Path:
    path.mkdir(parents=True)
    save_file(MomentumMemory(size, dim).state_dict(), str(path / "memory.safetensors"))
    return path


@pytest.mark.parametrize(
    ("saved", "now", "setting"),
    [((8, 4), (16, 4), "memory.size=8"), ((8, 4), (8, 6), "model.embed_dim=4")],
    ids=["h25_memory_size", "h26_embed_dim"],
)
def test_hostile_memory_mismatch_is_one_checkpoint_error(
    tmp_path: Path, saved: tuple[int, int], now: tuple[int, int], setting: str
) -> None:
    """Invariant: a checkpoint whose memory is K×D resumes only into a K×D memory; otherwise a
    CheckpointError names the setting with the saved and the current value, before the engine
    or the memory is touched."""
    directory = _checkpoint_with_memory(tmp_path / "step-00000002", *saved)
    memory = MomentumMemory(*now)
    parts = Parts(engine=_NoEngine(), momentum=None, memory=memory, stats=None)
    with pytest.raises(CheckpointError) as err:
        load_run_checkpoint(directory, {}, {}, parts, rank=0)
    message = str(err.value)
    assert "\n" not in message and setting in message and str(directory) in message
    current = setting.split("=")[0] + f"={now[0] if 'size' in setting else now[1]}"
    assert current in message


def test_hostile_matching_memory_passes_the_check(tmp_path: Path) -> None:
    """Invariant: the shape check refuses only a mismatch (a matching memory reaches the
    engine)."""
    directory = _checkpoint_with_memory(tmp_path / "step-00000002", 8, 4)
    parts = Parts(engine=_NoEngine(), momentum=None, memory=MomentumMemory(8, 4), stats=None)
    with pytest.raises(AssertionError, match="engine state loaded"):
        load_run_checkpoint(directory, {}, {}, parts, rank=0)


def test_hostile_train_exits_2_with_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """Invariant: through ``python -m fne_dist.train`` the mismatch is exit status 2 and one
    ``error:`` line, not a traceback (CheckpointError is a user error)."""
    directory = _checkpoint_with_memory(tmp_path / "step-00000002", 8, 4)
    parts = Parts(engine=_NoEngine(), momentum=None, memory=MomentumMemory(16, 4), stats=None)

    def fail(*_args, **_kwargs):
        load_run_checkpoint(directory, {}, {}, parts, rank=0)

    monkeypatch.setattr("fne_dist.loop.train", fail)
    code = train_main(
        ["--config", str(ROOT / "tests/configs/tiny.yaml"), f"run.output_dir={tmp_path}"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "memory.size" in err
