import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anefx
from helpers import apply, half_copy, max_abs_diff, ops, prepare

aten = torch.ops.aten


def test_sdpa_becomes_per_head_einsums():
    cap, gm = prepare("tiny_attention", "linear_to_conv")
    out, rec = apply("attention_bc1s", gm, cap)
    counts = ops(out)
    assert rec.stats == {"rewritten": 1, "heads": 2, "unmatched": 0, "patterns": {"sdpa": 1}}
    assert "aten.scaled_dot_product_attention" not in counts and "aten.matmul" not in counts
    einsums = [n.args[0] for n in out.graph.nodes if n.target == aten.einsum.default]
    assert einsums == ["bchq,bkhc->bkhq", "bkhq,bchk->bchq"] * 2
    softmax = [n for n in out.graph.nodes if n.target == aten._softmax.default]
    assert all(n.args[1] == 1 and n.meta["val"].shape[2] == 1 for n in softmax)  # over keys, (B, S_k, 1, S_q)
    assert counts["aten.permute"] == 3  # the input in, the one K transpose, the output out
    assert max_abs_diff(out, cap) < 1e-5
    _, again = apply("attention_bc1s", out, cap)
    assert not again.modified


class Attn(nn.Module):
    """Attention in many spellings; ``kind`` picks one."""

    def __init__(self, kind, c=16, heads=4, kv_heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.h, self.hk, self.d = kind, heads, kv_heads, c // heads
        self.q = nn.Linear(c, c)
        self.k = nn.Linear(c, self.d * kv_heads)
        self.v = nn.Linear(c, self.d * kv_heads)

    def split(self, t, heads):
        b, s, _ = t.shape
        return t.view(b, s, heads, self.d).transpose(1, 2)

    def forward(self, x, ctx, mask):
        q = self.split(self.q(x), self.h)
        src = ctx if self.kind == "cross" else x
        k, v = self.split(self.k(src), self.hk), self.split(self.v(src), self.hk)
        kind = self.kind
        if kind in ("sdpa", "cross"):
            o = F.scaled_dot_product_attention(q, k, v)
        elif kind == "bool_mask":
            o = F.scaled_dot_product_attention(q, k, v, mask.bool()[:, None, None, :])
        elif kind == "float_mask":
            add = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            o = F.scaled_dot_product_attention(q, k, v, add.expand(-1, 1, x.shape[1], -1))
        elif kind == "causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif kind == "scale":
            o = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        elif kind == "gqa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif kind == "repeat_kv":
            rep = self.h // self.hk
            b, hk, s, d = k.shape
            k = k[:, :, None].expand(b, hk, rep, s, d).reshape(b, hk * rep, s, d)
            v = v[:, :, None].expand(b, hk, rep, s, d).reshape(b, hk * rep, s, d)
            o = F.scaled_dot_product_attention(q, k, v)
        elif kind == "eager":
            w = (q @ k.transpose(-1, -2)) / math.sqrt(self.d)
            w = w + (1.0 - mask[:, None, None, :].float()) * -1e9
            o = torch.softmax(w, dim=-1) @ v
        elif kind == "eager_masked_fill":
            w = (q * self.d**-0.5) @ k.permute(0, 1, 3, 2)
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            w = w.masked_fill(~causal, float("-inf"))
            o = torch.softmax(w, dim=-1) @ v
        b, _, s, _ = o.shape
        return o.transpose(1, 2).reshape(b, s, -1)


KINDS = [
    "sdpa",
    "cross",
    "bool_mask",
    "float_mask",
    "causal",
    "scale",
    "gqa",
    "repeat_kv",
    "eager",
    "eager_masked_fill",
]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_spellings(kind):
    kv = 2 if kind in ("gqa", "repeat_kv") else 4
    model = Attn(kind, kv_heads=kv).eval()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    args = (torch.randn(1, 6, 16), torch.randn(1, 9, 16), mask)
    cap = anefx.capture(model, args)
    res = anefx.Pipeline.from_names(["linear_to_conv", "attention_bc1s"]).run(
        cap.graph_module, cap.flat_inputs, reference_outputs=cap.reference_outputs
    )
    rec = res.records[1]
    assert rec.modified and not rec.rolled_back, rec.error
    assert rec.stats["rewritten"] == 1 and rec.stats["heads"] == 4
    counts = ops(res.graph_module)
    for op in ("aten.scaled_dot_product_attention", "aten.matmul", "aten.linear"):
        assert op not in counts, (op, counts)
    assert counts["aten.einsum"] == 8
    assert max_abs_diff(res.graph_module, cap) < 1e-5


def test_other_activation_products_are_left_alone():
    class Gram(nn.Module):
        def forward(self, x):
            return torch.relu(x @ x.transpose(1, 2)) @ x  # no softmax: not attention

    cap = anefx.capture(Gram(), (torch.randn(1, 5, 4),))
    out, rec = apply("attention_bc1s", cap.graph_module, cap)
    assert not rec.modified and ops(out)["aten.matmul"] == 2


def test_a_softmax_over_a_projection_is_no_attention():
    """A router's softmax over a projection weighting experts by a sum over a product (mixture of
    experts): no product of activations computes its scores, so it is no attention, matched or not."""

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.experts = nn.Linear(8, 4), nn.Linear(8, 32)

        def forward(self, x):
            w = self.gate(x).softmax(-1)  # (B, S, E)
            outs = self.experts(x).view(*x.shape[:2], 4, 8)  # (B, S, E, C)
            return (w.unsqueeze(-1) * outs).sum(-2)

    cap = anefx.capture(Router().eval(), (torch.randn(1, 5, 8),))
    gm, _ = prepare_linear(cap)
    _, rec = apply("attention_bc1s", gm, cap)
    assert rec.stats == {"rewritten": 0, "heads": 0, "unmatched": 0}, rec.stats


def test_fp16():
    from examples.models import TinyAttention

    x, mask = torch.randn(1, 4, 8), torch.tensor([[1, 1, 1, 0]])
    model, (xh,) = half_copy(TinyAttention().eval(), (x,))
    compiled = anefx.compile(
        model, (xh, mask), pipeline=anefx.Pipeline.from_names(["linear_to_conv", "attention_bc1s"]), convert=False
    )
    rec = compiled.report.record("attention_bc1s")
    assert rec.modified and not rec.rolled_back and rec.max_abs_error < 1e-2


class Unmatchable(nn.Module):
    """Attention in spellings no pattern knows (planted): scores or weighted sum as ``einsum`` or
    as a sum over an elementwise product, the weights flipped over the keys before the value
    product, the softmax as ``_safe_softmax``, as ``log_softmax(…).exp()`` or spelled out."""

    def __init__(self, kind, c=16, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.h, self.d = kind, heads, c // heads
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = (t.view(b, s, self.h, self.d).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if self.kind == "einsum_scores":
            w = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.d**-0.5
        elif self.kind == "mul_sum_scores":
            w = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * self.d**-0.5
        else:
            w = q @ k.transpose(-1, -2) * self.d**-0.5
        if self.kind == "safe_softmax":
            w = torch.ops.aten._safe_softmax(w, -1)
        elif self.kind == "log_softmax":
            w = w.log_softmax(-1).exp()
        elif self.kind == "spelled_softmax":
            e = (w - w.amax(-1, keepdim=True)).exp()
            w = e / e.sum(-1, keepdim=True)
        else:
            w = w.softmax(-1)
        if self.kind == "flipped_weights":
            w = w.flip(-1)
        if self.kind == "mul_sum_values":
            o = (w.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
        else:
            o = torch.einsum("bhqk,bhkd->bhqd", w, v) if self.kind == "einsum_values" else w @ v
        return o.transpose(1, 2).reshape(b, s, c)


@pytest.mark.parametrize(
    "kind, why",
    [
        ("einsum_scores", r"\(aten\.einsum\).*: no attention pattern has this score product"),
        ("einsum_values", r"^%softmax .*weights read by %einsum\w* \(aten\.einsum\).*: no attention pattern$"),
        ("flipped_weights", r"^%softmax .*weights read by %matmul.* through %flip\w* \(aten\.flip\): no attention"),
        ("mul_sum_scores", r"^%sum\w* \(aten\.sum\) .*between QK\^T and softmax has no per-head form"),
        ("mul_sum_values", r"^%softmax .*weights read by %sum\w* \(aten\.sum\) .* through .*%mul\w* \(aten\.mul\)"),
        ("safe_softmax", r"^%_safe_softmax .*weights read by %matmul\w* \(aten\.matmul\) .*: no attention pattern$"),
        ("log_softmax", r"^%log_softmax .*weights read by %matmul\w* .* through %exp\w* \(aten\.exp\): no attention"),
        ("spelled_softmax", r"^%div\w* \(aten\.div\) .*weights read by %matmul\w* .*: no attention pattern$"),
    ],
)
def test_an_attention_no_pattern_matches_is_counted_unmatched(kind, why, monkeypatch, capsys):
    """Whatever the spelling, an attention is rewritten or counted with its reason, never skipped
    silently; ANEFX_MATCH_DEBUG says what the patterns made of the value product."""
    model = Unmatchable(kind).eval()
    cap = anefx.capture(model, (torch.randn(1, 6, 16),))
    gm, _ = prepare_linear(cap)
    product = [n.name for n in gm.graph.nodes if n.target in (aten.matmul.default, aten.einsum.default)][-1]
    monkeypatch.setenv("ANEFX_MATCH_DEBUG", product)
    out, rec = apply("attention_bc1s", gm, cap)
    assert rec.stats["unmatched"] == 1 and rec.stats["rewritten"] == 0 and not rec.modified, rec.stats
    (reason,) = rec.stats["unmatched_reasons"]
    assert re.search(why, reason), reason
    assert f"attention_bc1s: %{product} " in capsys.readouterr().err
    assert max_abs_diff(out, cap, [torch.randn(1, 6, 16)]) == 0.0


def prepare_linear(cap):
    res = anefx.Pipeline.from_names(["linear_to_conv"]).run(
        cap.graph_module, cap.flat_inputs, reference_outputs=cap.reference_outputs
    )
    return res.graph_module, res.records[0]
