"""Self-contained exports in one process: a frozen transformers image tower travels with the
export (its source folder gone, the export still loads and embeds alike), and an incomplete
or tampered export fails with one line naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fne_dist.api import Retriever
from fne_dist.checkpoint.format import CheckpointError
from fne_dist.config import load_config, save_config
from fne_dist.encoders import build_image_backbone, build_text_backbone
from fne_dist.export import fit_weights, with_tower_weights
from fne_dist.export import main as export_main
from fne_dist.model import build_dual_encoder
from fne_dist.pretrained import load_towers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _run_dir(path: Path, overrides: list[str]) -> Path:
    """A run directory of the tiny config with ``overrides``: config + random head weights."""
    path.mkdir(parents=True)
    cfg = load_config(TINY, overrides)
    save_config(cfg, path / "config.yaml")
    torch.manual_seed(1)
    model = build_dual_encoder(
        cfg.model, build_image_backbone(cfg.model.image), build_text_backbone(cfg.model.text)
    )
    save_file(
        {
            k: (torch.randn_like(v) if v.is_floating_point() else v).contiguous()
            for k, v in model.state_dict().items()
        },
        str(path / "model.safetensors"),
    )
    return path


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40 + 7 * i, 30), (30 * i, 200 - 20 * i, 90)) for i in range(5)]


CAPTIONS = ["a red square", "two dogs on a beach", "an empty street at night"]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local transformers ViT folder (random weights, its own mean/std)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
    ).save_pretrained(folder)
    return folder


def test_export_carries_a_frozen_hf_image_tower(tiny_vit: Path, tmp_path: Path) -> None:
    """Invariant: exporting a run whose frozen image tower is a transformers model writes that
    model (which model.safetensors lacks) into image_encoder/ as a standard save_pretrained
    folder; with the source folder deleted, from_pretrained and Retriever.load of the export
    embed images and captions exactly as the run directory did."""
    source = tmp_path / "vit-source"
    shutil.copytree(tiny_vit, source)
    image = [
        "model.image.type=hf",
        f"model.image.name_or_path={source}",
        "model.image.frozen=true",
    ]
    run = _run_dir(tmp_path / "run", image)
    weights = load_file(str(run / "model.safetensors"))
    assert not any(k.startswith("image_backbone.") for k in weights)  # frozen: not in the model
    trained = Retriever.load(run)
    want_img, want_txt = trained.encode_images(_images()), trained.encode_texts(CAPTIONS)
    out = tmp_path / "export"
    assert export_main([str(run), str(out)]) == 0
    shutil.rmtree(source)  # the export must not look the backbone up again
    with pytest.raises(ValueError, match="not available offline"):
        Retriever.load(run)
    for loaded in (Retriever.from_pretrained(out), Retriever.load(out)):
        assert torch.equal(loaded.encode_images(_images()), want_img)
        assert torch.equal(loaded.encode_texts(CAPTIONS), want_txt)
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out / "image_encoder").config.hidden_size == 24
    spec = json.loads((out / "preprocessing.json").read_text())
    assert spec["image_size"] == 32
    assert spec["pixel_mean"] == pytest.approx([0.4 * 255, 0.5 * 255, 0.6 * 255])
    hashes = json.loads((out / "export.json").read_text())["sha256"]
    assert {"image_encoder/model.safetensors", "text_encoder/tokenizer.json"} <= set(hashes)


def _tensor_copies(out: Path) -> tuple[dict[str, list[str]], int]:
    """Every floating-point tensor of more than one element in the export's safetensors files,
    by the sha256 of its bytes: file:name of each copy; and the files' total bytes."""
    copies: dict[str, list[str]] = {}
    files = sorted(out.rglob("*.safetensors"))
    for path in files:
        for name, t in load_file(str(path)).items():
            if t.is_floating_point() and t.numel() > 1:
                data = t.contiguous().view(torch.uint8).numpy().tobytes()
                digest = hashlib.sha256(data).hexdigest()
                copies.setdefault(digest, []).append(f"{path.relative_to(out)}:{name}")
    return copies, sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("image", ["tiny", "hf"])
def test_export_stores_each_tensor_once(tiny_vit: Path, tmp_path: Path, image: str) -> None:
    """Invariant: an export of a run whose backbones train holds each tensor once: no
    tensor's bytes are in two of its safetensors files (model.safetensors leaves out what
    image_encoder/ and text_encoder/ hold; the run's weights are random, so two equal float
    tensors can only be one stored twice), and loading it (from_pretrained, load, evaluate's
    path) gives the run's weights, every one, bit for bit. Both backbone folder kinds: the
    tiny nets' trunk file and a transformers ViT's save_pretrained folder."""
    overrides = (
        [] if image == "tiny" else ["model.image.type=hf", f"model.image.name_or_path={tiny_vit}"]
    )
    run = _run_dir(tmp_path / "run", overrides)
    want = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("image_backbone.") for k in want)  # trained: in the model
    out = tmp_path / "export"
    assert export_main([str(run), str(out)]) == 0
    copies, size = _tensor_copies(out)
    twice = {d: names for d, names in copies.items() if len(names) > 1}
    assert not twice, list(twice.values())[:5]
    for loaded in (Retriever.from_pretrained(out), Retriever.load(out)):
        got = loaded.model.state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), image
    cfg = load_config(out / "config.yaml")
    _, image_backbone, text_backbone = load_towers(out)
    model = build_dual_encoder(cfg.model, image_backbone, text_backbone)
    tensors = with_tower_weights(model, load_file(str(out / "model.safetensors")))
    fit_weights(model, tensors, "export")  # what evaluate_weights does with an export
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    run_size = (run / "model.safetensors").stat().st_size
    print(f"\n{image}: the export's safetensors {size} bytes, the run's weights {run_size}")


def test_evaluate_of_an_export_equals_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: `python -m fne_dist.evaluate` of an export (its model.safetensors without
    the trained backbones' tensors, which it reads from image_encoder/ and text_encoder/)
    prints the metrics of the run directory it was exported from (the tiny config's test
    split, initial weights)."""
    from fne_dist.evaluate import main as evaluate_main

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(TINY, ["run.threads=1"])
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(1)
    model = build_dual_encoder(
        cfg.model, build_image_backbone(cfg.model.image), build_text_backbone(cfg.model.text)
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors")
    )
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    printed = []
    for where in (run, tmp_path / "out"):
        assert evaluate_main([str(where), "--split", "test"]) == 0
        printed.append(json.loads(capsys.readouterr().out))
    assert printed[0] == printed[1] and printed[0]["rsum"] > 0, printed


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of the tiny config, loaded once intact."""
    tmp = tmp_path_factory.mktemp("tiny-export")
    out = tmp / "export"
    assert export_main([str(_run_dir(tmp / "run", [])), str(out)]) == 0
    Retriever.from_pretrained(out)
    return out


def _break_json(name: str, change: dict) -> object:
    def apply(out: Path) -> None:
        data = json.loads((out / name).read_text())
        data.update(change)
        (out / name).write_text(json.dumps(data))

    return apply


def _truncate(name: str) -> object:
    def apply(out: Path) -> None:
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])

    return apply


BREAKS = {
    "no image_encoder": lambda out: shutil.rmtree(out / "image_encoder"),
    "no preprocessing": lambda out: (out / "preprocessing.json").unlink(),
    "encoder outside": _break_json("fne_export.json", {"text_encoder": "../elsewhere"}),
    "other format": _break_json("fne_export.json", {"format": 99}),
    "two means": _break_json("preprocessing.json", {"pixel_mean": [1.0, 2.0]}),
    "other size": _break_json("preprocessing.json", {"image_size": 48}),
    "truncated trunk": _truncate("image_encoder/model.safetensors"),
    "not json": lambda out: (out / "fne_export.json").write_text("{"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_hostile_incomplete_export_fails_with_one_line(
    tiny_export: Path, tmp_path: Path, case: str
) -> None:
    """Invariant: an export with a folder or file missing, an entry pointing outside it, or
    a malformed small config, preprocessing or weights file fails to load with one line
    naming the file (a CheckpointError), never a traceback from deep in a loader."""
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    BREAKS[case](out)
    with pytest.raises(CheckpointError) as err:
        Retriever.from_pretrained(out)
    assert "\n" not in str(err.value) and str(out) in str(err.value)


def test_hostile_export_of_a_run_whose_encoder_is_gone_exits_2(
    tmp_path: Path, tiny_vit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: exporting needs the run's encoders on the exporting machine; when one is not
    there, export exits 2 with one line naming it and writes nothing."""
    source = tmp_path / "vit-source"
    shutil.copytree(tiny_vit, source)
    run = _run_dir(tmp_path / "run", ["model.image.type=hf", f"model.image.name_or_path={source}"])
    shutil.rmtree(source)
    capsys.readouterr()  # what building the run directory printed
    assert export_main([str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(source) in err
    assert not (tmp_path / "out").exists()
