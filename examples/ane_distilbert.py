"""A DistilBERT written by hand the way Apple's ANE guidance describes it, as the benchmark's yardstick.

"Deploying Transformers on the Apple Neural Engine" (Apple machine learning research, 2022) gives four
principles, followed here from their description: activations are ``(B, C, 1, S)`` (channels first, the
sequence on the last axis); every projection is a 1x1 ``Conv2d``; attention is split per head on the
channel axis and computed with one ``einsum`` for the scores and one for the weighted values, so no
tensor is reshaped or transposed inside a layer (only K, once, puts its sequence on the channel side);
LayerNorm normalises over the channel axis of ``(B, C, 1, S)``.

The benchmark converts this module with coremltools (``torch.export`` → ``ct.convert``, the same options
anefx uses) and compares that time with ``anefx.compile`` of the stock transformers DistilBERT of the
same size: anefx produces the same structure (36 conv, 144 einsum, 72 softmax for the full model), so the
conversion of this module is what an expert who rewrote the model by hand would wait for.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, 1, S)."""

    def __init__(self, dim: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        centred = x - x.mean(dim=1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return centred * scale * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class PerHeadAttention(nn.Module):
    """Multi-head self-attention on (B, C, 1, S): 1x1 conv projections, one einsum pair per head."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Conv2d(dim, dim, 1) for _ in range(4))

    def forward(self, x, key_bias):
        # key_bias: (B, S_k, 1, 1), 0 where a key may be attended to, a large negative where not
        q = self.q(x) * (1.0 / math.sqrt(self.head_dim))
        k = self.k(x).transpose(1, 3)  # (B, S_k, 1, C): the sequence on the channel side, once
        v = self.v(x)
        outs = []
        for qh, kh, vh in zip(
            q.split(self.head_dim, dim=1), k.split(self.head_dim, dim=3), v.split(self.head_dim, dim=1), strict=True
        ):
            scores = torch.einsum("bchq,bkhc->bkhq", qh, kh) + key_bias  # (B, S_k, 1, S_q)
            weights = scores.softmax(dim=1)
            outs.append(torch.einsum("bkhq,bchk->bchq", weights, vh))  # (B, D, 1, S_q)
        return self.out(torch.cat(outs, dim=1))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attention = PerHeadAttention(dim, heads)
        self.norm1 = ChannelLayerNorm(dim)
        self.ffn_in = nn.Conv2d(dim, hidden, 1)
        self.ffn_out = nn.Conv2d(hidden, dim, 1)
        self.norm2 = ChannelLayerNorm(dim)

    def forward(self, x, key_bias):
        x = self.norm1(x + self.attention(x, key_bias))
        return self.norm2(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))


class AneDistilBert(nn.Module):
    """DistilBERT's encoder (embeddings + layers) in (B, C, 1, S); returns (B, C, 1, S) hidden states."""

    def __init__(self, vocab=30522, positions=512, dim=768, heads=12, hidden=3072, layers=6):
        super().__init__()
        self.words = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(positions, dim)
        self.norm = ChannelLayerNorm(dim)
        self.layers = nn.ModuleList(Layer(dim, heads, hidden) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        emb = self.words(input_ids) + self.positions(torch.arange(s).unsqueeze(0))  # (B, S, C)
        x = self.norm(emb.transpose(1, 2).unsqueeze(2))  # (B, C, 1, S): the one layout change
        key_bias = ((1.0 - attention_mask.to(x.dtype)) * -1e4)[:, :, None, None]  # (B, S_k, 1, 1)
        for layer in self.layers:
            x = layer(x, key_bias)
        return x


def ane_distilbert(n_layers: int = 6, dim: int = 768, heads: int = 12, seq: int = 128):
    """(model, args, kwargs) with seeded random weights, the size of ``models.distilbert``'s defaults."""
    torch.manual_seed(0)
    model = AneDistilBert(dim=dim, heads=heads, hidden=4 * dim, layers=n_layers).eval()
    for name, p in model.named_parameters():
        with torch.no_grad():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.normal_(1.0, 0.2) if is_norm_weight else p.normal_(0.0, 0.02)
    ids = torch.randint(0, 30522, (1, seq))
    return model, (ids, torch.ones(1, seq, dtype=torch.long)), {}
