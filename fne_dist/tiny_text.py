"""The tests' tiny text network in plain torch, with MiniLM's real tokenizer.

Why not a 2-layer ``transformers.BertModel``: importing it (transformers' modeling utilities
pull in torch.distributed.tensor and torch._dynamo) costs ~4 s of CPU per process, a third of a
whole tiny run, paid by every rank of every system test. This net keeps what the tests need
(token and position embeddings, self-attention over the padding mask, a last hidden state
that ``TextBackbone`` mean-pools) and imports nothing beyond torch and ``tokenizers``.

The tokenizer is MiniLM's ``tokenizer.json`` through the ``tokenizers`` library, the same
pipeline ``AutoTokenizer`` wraps: captions tokenize exactly as in a real run
(tests/test_encoders.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class JsonTokenizer:
    """A ``tokenizers.Tokenizer`` called like a transformers tokenizer (the one form
    ``CaptionTokenizer`` uses: fixed-length padding, truncation, torch tensors)."""

    tokenizer: Any  # tokenizers.Tokenizer (picklable, for data-loader workers)
    pad_token_id: int
    vocab_size: int

    @classmethod
    def from_dir(cls, path: str | Path) -> JsonTokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        pad = tok.token_to_id("[PAD]")
        return cls(tok, pad, tok.get_vocab_size(with_added_tokens=False))

    def __call__(
        self,
        captions: list[str],
        padding: str,
        truncation: bool,
        max_length: int,
        return_tensors: str,
    ) -> dict[str, Tensor]:
        assert padding == "max_length" and truncation and return_tensors == "pt"
        tok = self.tokenizer
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token="[PAD]")
        encodings = tok.encode_batch(captions)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": mask}


class TinyTextOutput(NamedTuple):
    last_hidden_state: Tensor  # B×L×F


class _Block(nn.Module):
    """Pre-norm self-attention and a 2× MLP. Every weight is used through a submodule's own
    forward (nn.Linear), which is what ZeRO-3's parameter gathering hooks on."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h_BLF: Tensor, bias_B11L: Tensor) -> Tensor:
        b, length, dim = h_BLF.shape
        qkv = self.qkv(self.norm1(h_BLF)).view(b, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each B×heads×L×(F/heads)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_B11L)
        h_BLF = h_BLF + self.out(att.transpose(1, 2).reshape(b, length, dim))
        return h_BLF + self.down(F.gelu(self.up(self.norm2(h_BLF))))


@dataclass(frozen=True)
class TinyTextConfig:
    hidden_size: int  # what TextBackbone reads of a transformers model's config


class TinyTextEncoder(nn.Module):
    """Token + position embeddings, ``layers`` blocks, a final LayerNorm."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, positions: int) -> None:
        super().__init__()
        self.config = TinyTextConfig(dim)
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(positions, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TinyTextOutput:
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        h_BLF = self.tokens(input_ids) + self.positions(steps)
        # An additive bias, not a boolean mask: a row of padding only gives finite values
        # (TextBackbone's pooling then ignores it), never NaN.
        keep_B11L = attention_mask[:, None, None, :].to(h_BLF.dtype)
        bias_B11L = (1.0 - keep_B11L) * torch.finfo(h_BLF.dtype).min
        for block in self.blocks:
            h_BLF = block(h_BLF, bias_B11L)
        return TinyTextOutput(self.norm(h_BLF))
