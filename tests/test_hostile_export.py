"""Hostile checkpoints, run directories and export targets: a
meta.json of the wrong shape is an invalid checkpoint like any other, corrupt weights and bad
export targets fail with one line and exit status 2, never a traceback or a silent copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fne_dist.checkpoint.collective import finalize
from fne_dist.checkpoint.format import META, CheckpointError, sha256_of, step_dir
from fne_dist.checkpoint.validation import find_resumable, validate
from fne_dist.config import load_config, save_config
from fne_dist.evaluate import main as evaluate_main
from fne_dist.export import fit_weights, load_weights, sidecar
from fne_dist.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(path: Path) -> Path:
    """A run directory: the tiny test config (resolved) and its model's initial weights (an
    export builds the model to write its backbones, so the weights must fit it)."""
    from fne_dist.encoders import build_image_backbone, build_text_backbone
    from fne_dist.model import build_dual_encoder

    path.mkdir(parents=True)
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml")
    save_config(cfg, path / "config.yaml")
    model = build_dual_encoder(
        cfg.model, build_image_backbone(cfg.model.image), build_text_backbone(cfg.model.text)
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    return path


def _checkpoint(root: Path, step: int) -> Path:
    """A valid checkpoint written by checkpoint.finalize (hashes + meta.json)."""
    tmp = root / f"step-{step:08d}.tmp"
    _run_dir(tmp)
    final = step_dir(root, step)
    finalize(tmp, final, {"step": step}, keep_last=0)
    return final


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


BAD_METAS = {
    "format only": {"format": 1},
    "a list": [1, 2],
    "files not a table": {"format": 1, "files": [["model.safetensors", 1]]},
    "entry without size": {"format": 1, "files": {"model.safetensors": {"sha256": "00"}}},
    "entry outside": {"format": 1, "files": {"../x": {"size": 1, "sha256": "00"}}},
}


@pytest.mark.parametrize("shape", list(BAD_METAS))
def test_hostile_resume_latest_skips_meta_of_the_wrong_shape(tmp_path: Path, shape: str) -> None:
    """Invariant: resume=latest skips a newer checkpoint whose meta.json has the wrong shape
    (no 'files', a list, malformed entries, a file outside the directory) with a warning
    naming it, and resumes from the newest valid one: no KeyError."""
    root = tmp_path / "checkpoints"
    good = _checkpoint(root, 1)
    bad = _checkpoint(root, 2)
    (bad / META).write_text(json.dumps(BAD_METAS[shape]))
    warnings: list[str] = []
    path, meta = find_resumable("latest", root, warnings.append)
    assert path == good and meta["step"] == 1
    assert len(warnings) == 1 and bad.name in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("shape", list(BAD_METAS))
def test_hostile_export_of_meta_of_the_wrong_shape_fails_cleanly(
    tmp_path: Path, shape: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: exporting a checkpoint whose meta.json has the wrong shape exits 2 with one
    line naming the checkpoint, and writes nothing."""
    bad = _checkpoint(tmp_path / "checkpoints", 2)
    (bad / META).write_text(json.dumps(BAD_METAS[shape]))
    assert export_main([str(bad), str(tmp_path / "out")]) == 2
    assert str(bad) in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_hostile_evaluate_on_corrupt_weights_fails_with_one_line(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: `fne_dist.evaluate` on a corrupt model.safetensors (garbage, truncated, empty)
    exits 2 with one line naming the file, not a SafetensorError traceback."""
    run = _run_dir(tmp_path / "run")
    weights = run / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(
        {"garbage": b"\x00not safetensors" * 9, "truncated": raw[:-40], "empty": b""}[damage]
    )
    assert evaluate_main([str(run)]) == 2
    assert str(weights) in _one_error_line(capsys)


def test_hostile_weights_that_do_not_fit_the_model_fail_with_one_line(tmp_path: Path) -> None:
    """Invariant: weights with other tensor names or shapes than the config's model fail with one
    line counting what is missing, unexpected or of another shape (evaluate and the API share
    this check)."""
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError) as err:
        fit_weights(model, {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}, "w.st")
    message = str(err.value)
    assert "\n" not in message and "w.st" in message
    assert "1 missing" in message and "1 unexpected" in message and "1 of another shape" in message
    fit_weights(model, {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, "w.st")
    assert model.weight.sum().item() == 6


def test_hostile_export_refuses_corrupt_run_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: export of a run directory whose model.safetensors is truncated exits 2 naming
    it (no copy with exit 0); an export carries a sha256 file, and weights that no longer match
    it are refused by export, evaluate and the API loader alike."""
    run = _run_dir(tmp_path / "run")
    good = run / "model.safetensors"
    intact = good.read_bytes()
    good.write_bytes(intact[: len(intact) // 2])
    assert export_main([str(run), str(tmp_path / "out")]) == 2
    assert str(good) in _one_error_line(capsys)
    assert not (tmp_path / "out" / "model.safetensors").exists()

    good.write_bytes(intact)
    out = tmp_path / "out"
    assert export_main([str(run), str(out)]) == 0
    exported = out / "model.safetensors"
    assert sidecar(exported).read_text().split()[0] == sha256_of(exported)
    assert load_weights(exported)["temperature"].shape == (1,)
    data = bytearray(exported.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit inside a tensor: still loads as safetensors
    exported.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_weights(exported)
    assert export_main([str(out), str(tmp_path / "again")]) == 2
    assert "sha256" in _one_error_line(capsys)


def test_hostile_export_onto_an_existing_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: export onto an existing file exits 2 with one line and leaves the file as
    it was; export into an existing export directory replaces its files."""
    run = _run_dir(tmp_path / "run")
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    assert export_main([str(run), str(target)]) == 2
    assert str(target) in _one_error_line(capsys)
    assert target.read_text() == "keep me"
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_hostile_export_onto_its_source_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: export onto its own source (same path, or another spelling of it) exits 2
    with one line and leaves the source intact."""
    run = _run_dir(tmp_path / "run")
    before = (run / "model.safetensors").read_bytes()
    for out in (run, tmp_path / "run" / ".." / "run"):
        assert export_main([str(run), str(out)]) == 2
        assert "source" in _one_error_line(capsys)
    assert (run / "model.safetensors").read_bytes() == before
    step = _checkpoint(tmp_path / "checkpoints", 3)
    assert export_main([str(step), str(step)]) == 2
    _one_error_line(capsys)
    validate(step)  # still a valid checkpoint
