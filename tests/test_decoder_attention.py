"""Issue 12 (items 2 and 5): decoder attention in Apple's per-head form.

Small decoders from ``transformers`` configs with re-initialised random weights: rotary embeddings
(half rotation, partial as in GPT-NeoX), QK-norm (Qwen3), GQA through ``repeat_kv``, sliding windows
(Mistral). Judged on the Core ML program's MIL ops and on numerics with right-padded masks the
compile never saw.
"""

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

import anefx
from helpers import reads_projection

VOCAB, SEQ, HIDDEN = 256, 32, 64


def _reinit(model: nn.Module) -> nn.Module:
    """Nothing zero or identity: norm weights 1 ± 0.2, every other parameter N(0, 0.1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(name: str, layers: int) -> nn.Module:
    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    if name in ("llama", "llama_lm"):
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg) if name == "llama_lm" else tf.LlamaModel(cfg)
    elif name == "qwen3":
        model = tf.Qwen3Model(tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **common))
    elif name == "mistral":
        model = tf.MistralModel(tf.MistralConfig(num_key_value_heads=2, sliding_window=8, **common))
    elif name == "neox":
        model = tf.GPTNeoXModel(tf.GPTNeoXConfig(rotary_pct=0.5, **common))
    elif name == "gptj":  # interleaved (rotate_every_two) partial rotary
        cfg = tf.GPTJConfig(
            n_embd=HIDDEN, n_layer=layers, n_head=4, rotary_dim=8, vocab_size=VOCAB, n_positions=128, n_inner=128
        )
        model = tf.GPTJModel(cfg)
    elif name == "phi3":  # one fused qkv_proj sliced into Q, K and V, then rotary (GQA: 2 K/V heads)
        model = tf.Phi3Model(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common))
    elif name == "falcon":  # multi-query: one K/V head behind the fused query_key_value, then rotary
        cfg = tf.FalconConfig(multi_query=True, new_decoder_architecture=False, alibi=False, **common)
        model = tf.FalconModel(cfg)
    elif name == "bloom":  # ALiBi biases through baddbmm on (B·H, S, D), fused query_key_value
        model = tf.BloomModel(tf.BloomConfig(hidden_size=HIDDEN, n_layer=layers, n_head=4, vocab_size=VOCAB))
    elif name == "opt":
        cfg = tf.OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=HIDDEN,
        )
        model = tf.OPTModel(cfg)
    else:
        raise KeyError(name)
    return _reinit(model)


def inputs(pad: int = 0, seed: int = 2):
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, SEQ, dtype=torch.long)
    if pad:
        mask[:, -pad:] = 0
    return (ids,), {"attention_mask": mask}


def _main_output(out) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_numerics(model, compiled, seed: int = 2):
    """Within 1e-4 relative on the example and, on the valid tokens, with right padding (``seed``:
    other token ids)."""
    for pad in (0, 5, 13):
        args, kwargs = inputs(pad, seed)
        with torch.no_grad():
            ref = _main_output(model(*args, **kwargs))[:, : SEQ - pad]
        out = _main_output(compiled(*args, **kwargs))[:, : SEQ - pad]
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < 1e-4, (pad, err)


def _check_shipped_program(model, compiled, seed: int = 7):
    """The Core ML program itself (fp16, run by anefx's MIL interpreter) within 1e-2 of the output's
    scale on the valid tokens, with right paddings and token ids the compile never saw."""
    program = anefx.load(compiled.mlmodel)
    for pad in (0, 5, 13):
        args, kwargs = inputs(pad, seed)
        (out, *_) = program(dict(zip(program.inputs(), [*args, *kwargs.values()]))).values()
        with torch.no_grad():
            ref = _main_output(model(*args, **kwargs))[:, : SEQ - pad]
        out = torch.from_numpy(np.asarray(out, np.float32))[:, : SEQ - pad]
        assert torch.isfinite(out).all(), pad
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < 1e-2, (pad, err)


def _attention_record(compiled):
    (rec,) = [r for r in compiled.report.records if r.name == "attention_bc1s"]
    assert not rec.rolled_back, rec.error
    return rec


#: per decoder: the attention pattern that matches it, and the reshapes its MIL program keeps
DECODERS = {
    "llama": ("sdpa", 0),
    "qwen3": ("sdpa", 0),
    "mistral": ("sdpa", 0),
    "neox": ("sdpa", 0),
    "llama_lm": ("sdpa", 0),
    # issue 21: Phi-3's one qkv_proj sliced into Q, K and V then rotary (its empty pass-through of a
    # full rotary dropped), Falcon's multi-query attention behind one query_key_value (K and V
    # picked by a constant index: a slice), Bloom's ALiBi through baddbmm on (B·H, S, D) (its
    # (B·H, 1, S) bias reshaped once for all layers)
    "phi3": ("sdpa", 0),
    "falcon": ("sdpa", 0),
    "bloom": ("baddbmm", 2),
}


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_attention_is_per_head_at_depth_2_and_4(name):
    """Every layer per head, no matmul, one transpose per added layer, exact on right padding and on
    token ids the compile never saw, in the rewritten graph and in the Core ML program it ships."""
    pattern, reshapes = DECODERS[name]
    counts = {}
    for layers in (2, 4):
        model = build(name, layers)
        args, kwargs = inputs()
        compiled = anefx.compile(model, args, kwargs)
        rec = _attention_record(compiled)
        assert rec.stats["rewritten"] == layers and rec.stats["unmatched"] == 0, rec.stats
        assert rec.stats["heads"] == 4 * layers and rec.stats["patterns"] == {pattern: layers}, rec.stats
        ops = compiled.op_histogram()
        assert ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0, ops
        assert ops["einsum"] == 2 * 4 * layers and ops["softmax"] == 4 * layers, ops
        assert ops.get("gather_nd", 0) == 0, ops  # cos/sin reach the heads as (1, D, 1, S) tensors
        counts[layers] = (ops.get("transpose", 0), ops.get("reshape", 0))
        _check_numerics(model, compiled)
        _check_numerics(model, compiled, seed=7)
        _check_shipped_program(model, compiled)
    (t2, r2), (t4, r4) = counts[2], counts[4]
    assert t4 - t2 <= 2, counts  # at most one transpose per added layer: the K transpose
    assert r4 == r2 == reshapes, counts


def test_rotary_runs_on_channel_chunks_without_leaving_bc1s():
    """No rank-4 head tensor in (B, H, S, D) is left: every op between the projections and the
    einsums reads (B, C, 1, S) chunks; rotate_half is a split, a neg and a cat on the channel axis."""
    model = build("llama", 2)
    args, kwargs = inputs()
    compiled = anefx.compile(model, args, kwargs, convert=False)
    aten = torch.ops.aten
    for n in compiled.graph_module.graph.nodes:
        if n.target in (aten.neg.default, aten.einsum.default, aten._softmax.default):
            assert n.meta["val"].shape[2] == 1, n.format_node()  # (B, D or S_k, 1, S)
    hist = {str(n.target) for n in compiled.graph_module.graph.nodes}
    assert "aten.scaled_dot_product_attention.default" not in hist


def test_opt_attention_is_rewritten():
    model = build("opt", 2)
    args, kwargs = inputs()
    compiled = anefx.compile(model, args, kwargs)
    rec = _attention_record(compiled)
    assert rec.stats["rewritten"] == 2 and rec.stats["unmatched"] == 0, rec.stats
    ops = compiled.op_histogram()
    assert ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0, ops
    _check_numerics(model, compiled)


class SoftCapped(nn.Module):
    """Gemma-2 style logit soft-capping between QK^T and softmax; ``talking_heads`` mixes the heads'
    scores before the softmax (Shazeer et al. 2020), which no per-head form computes."""

    def __init__(self, c=16, heads=4, kind="softcap"):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.d, self.kind = heads, c // heads, kind
        self.qkv = nn.Linear(c, 3 * c)
        self.mix = nn.Parameter(torch.randn(heads, heads))

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = (t.view(b, s, self.h, self.d).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        w = q @ k.transpose(-1, -2)
        w = torch.tanh(w / 5.0) * 5.0 if self.kind == "softcap" else torch.einsum("bhqk,hg->bgqk", w, self.mix)
        return (w.softmax(-1) @ v).transpose(1, 2).reshape(b, s, c)


class BmmAttention(nn.Module):
    """Attention over 3-D (B·H, S, D) tensors as fairseq, BART and older OPT write it: ``bmm`` for
    QK^T, the padding mask added on a (B, H, S, S) view of the scores (``mask4d``), or ``baddbmm``
    adding a per-(batch, head) (B·H, 1, S) key bias with ``beta``/``alpha`` (``baddbmm``)."""

    def __init__(self, kind, c=16, heads=4):
        super().__init__()
        self.kind, self.h, self.d = kind, heads, c // heads
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.slopes = nn.Parameter(torch.rand(heads) + 0.1)

    def forward(self, x, keep):
        b, s, c = x.shape

        def heads(t):
            return t.view(b, s, self.h, self.d).transpose(1, 2).reshape(b * self.h, s, self.d)

        q, k, v = heads(self.q(x) * self.d**-0.5), heads(self.k(x)), heads(self.v(x))
        bias = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
        if self.kind == "baddbmm":
            alibi = self.slopes.view(1, self.h, 1, 1) * torch.arange(s).float().view(1, 1, 1, s)
            alibi = alibi.expand(b, -1, -1, -1).reshape(b * self.h, 1, s)
            w = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=0.5, alpha=2.0)
        else:
            w = torch.bmm(q, k.transpose(1, 2))
        w = (w.view(b, self.h, s, s) + bias).view(b * self.h, s, s)
        o = torch.bmm(w.softmax(-1), v)
        return o.view(b, self.h, s, self.d).transpose(1, 2).reshape(b, s, c)


def _check_padded_batches(model, compiled, channels: int):
    """Batches of 2 sequences of 8 with right paddings the compile never saw: within 1e-4 relative on
    each sequence's valid tokens."""
    for pads in ((0, 3), (5, 1)):
        x, keep = torch.randn(2, 8, channels), torch.tensor([[1] * (8 - p) + [0] * p for p in pads])
        with torch.no_grad():
            want = model(x, keep)
        got = compiled(x, keep)
        for i, p in enumerate(pads):
            err = float((got[i, : 8 - p] - want[i, : 8 - p]).abs().max() / want[i, : 8 - p].abs().max())
            assert err < 1e-4, (pads, err)


@pytest.mark.parametrize("kind", ["bmm", "baddbmm"])
def test_bmm_attention_is_per_head(kind):
    """3-D bmm/baddbmm attention becomes per-head einsums on (B, C, 1, S) chunks: no bmm, no
    (B·H, S, D) tensor; equal to eager on masks the compile never saw."""
    model = BmmAttention(kind)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape) + (0.3 if p.dim() == 1 else 0))
    model.eval()
    x, keep = torch.randn(2, 8, 16), torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    compiled = anefx.compile(model, (x, keep))
    rec = _attention_record(compiled)
    assert rec.stats == {"rewritten": 1, "heads": 4, "unmatched": 0, "patterns": {kind: 1}}, rec.stats
    ops = compiled.op_histogram()
    assert ops.get("matmul", 0) == 0 and ops.get("linear", 0) == 0 and ops["einsum"] == 8, ops
    _check_padded_batches(model, compiled, 16)


class Gemma2Style(nn.Module):
    """Gemma 2's attention: ``scores = cap · tanh(q·k / √d / cap)``, then the padding mask added
    (``finfo.min``, after the cap, as the model does), softmax upcast to float32 and cast back."""

    def __init__(self, c=32, heads=4, cap=2.0):
        super().__init__()
        self.h, self.d, self.cap = heads, c // heads, cap
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x, keep):
        b, s, c = x.shape
        q, k, v = (t.view(b, s, self.h, self.d).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        w = (q @ k.transpose(2, 3)) * self.d**-0.5
        w = torch.tanh(w / self.cap) * self.cap
        w = w + (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
        w = torch.softmax(w, -1, dtype=torch.float32).to(q.dtype)
        return (w @ v).transpose(1, 2).reshape(b, s, c)


def test_logit_soft_capping_is_carried_per_head():
    """The cap is element-wise: each head's score einsum gets ``tanh(·) · cap`` (the 1/(√d·cap)
    factor goes into Q), the mask is applied after it as the model does; no matmul is left."""
    model = Gemma2Style()
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape))
    model.eval()
    x, keep = torch.randn(2, 8, 32), torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    compiled = anefx.compile(model, (x, keep))
    rec = _attention_record(compiled)
    assert rec.stats == {"rewritten": 1, "heads": 4, "unmatched": 0, "patterns": {"matmul": 1}}, rec.stats
    ops = compiled.op_histogram()
    assert ops["tanh"] == 4 and ops["einsum"] == 8 and ops.get("matmul", 0) == 0, ops
    _check_padded_batches(model, compiled, 32)


def test_unrecognised_attention_is_counted_with_a_reason():
    """Scores mixed across heads before the softmax have no per-head form: counted, with the op."""
    model = SoftCapped(kind="talking_heads").eval()
    x = torch.randn(1, 8, 16)
    compiled = anefx.compile(model, (x,), convert=False)
    rec = _attention_record(compiled)
    assert rec.stats["unmatched"] == 1 and rec.stats["rewritten"] == 0, rec.stats
    (reason,) = rec.stats["unmatched_reasons"]
    assert "aten.einsum" in reason and "between QK^T and softmax" in reason, reason
    with torch.no_grad():
        x2 = torch.randn(1, 8, 16)
        assert float((compiled(x2) - model(x2)).abs().max()) < 1e-5


def test_unmatched_attention_reaches_the_ane_report():
    model = SoftCapped(kind="talking_heads").eval()
    compiled = anefx.compile(model, (torch.randn(1, 8, 16),))
    found = compiled.ane_report.by_rule().get("unmatched_attention", [])
    assert len(found) == 1 and "aten.einsum" in found[0].reason, found


def test_qwen3_qk_norm_is_one_layer_norm_per_head():
    """Qwen3's RMSNorm over head_dim on q and k: one MIL layer_norm per head input (of [x, -x], 2·D
    channels on axis 1 of the head's (B, D, 1, S) chunk) instead of pow/reduce_mean/rsqrt/mul."""
    per_layer = {}
    for layers in (2, 4):
        model = build("qwen3", layers)
        args, kwargs = inputs()
        compiled = anefx.compile(model, args, kwargs)
        rec = _attention_record(compiled)
        assert rec.stats["qk_norms"] == (4 + 2) * layers, rec.stats  # 4 query heads, 2 key heads
        ops = compiled.op_histogram()
        assert ops.get("reduce_mean", 0) == 0 and ops.get("rsqrt", 0) == 0 and ops.get("pow", 0) == 0, ops
        norms = [tuple(op.outputs[0].shape) for op in compiled.artifact.operations() if op.op_type == "layer_norm"]
        assert sorted(set(norms)) == [(1, 2 * 16, 1, SEQ), (1, 2 * HIDDEN, 1, SEQ)], norms
        assert norms.count((1, 32, 1, SEQ)) == 6 * layers  # the QK-norms
        assert norms.count((1, 128, 1, SEQ)) == 2 * layers + 1  # the hidden-size RMSNorms
        per_layer[layers] = ops
        _check_numerics(model, compiled)
    grow = {op: (per_layer[4].get(op, 0) - per_layer[2].get(op, 0)) / 2 for op in per_layer[4]}
    assert grow["layer_norm"] == 2 + 6 and grow["transpose"] <= 1, grow


def test_gptj_interleaved_rotary_is_per_head_in_half_split_order():
    """GPT-J's rotate_every_two (x[..., ::2], x[..., 1::2] stacked back) runs on channel chunks once
    the q and k projections compute each head's channels evens-first (weight rows permuted at compile
    time): q·k is unchanged by one permutation of both, v keeps the model's order."""
    counts = {}
    for layers in (2, 4):
        model = build("gptj", layers)
        args, kwargs = inputs()
        compiled = anefx.compile(model, args, kwargs)
        rec = _attention_record(compiled)
        assert rec.stats["rewritten"] == layers and rec.stats["unmatched"] == 0, rec.stats
        assert rec.stats["reordered_heads"] == 4 * layers, rec.stats
        ops = compiled.op_histogram()
        assert ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0 and ops.get("stack", 0) == 0, ops
        assert ops["einsum"] == 2 * 4 * layers and ops.get("gather", 0) <= 1, ops  # the position table only
        counts[layers] = ops
        _check_numerics(model, compiled)
    t2, t4 = counts[2].get("transpose", 0), counts[4].get("transpose", 0)
    assert t4 - t2 <= 2 and counts[4].get("reshape", 0) == counts[2].get("reshape", 0) == 0, counts
    graph = anefx.compile(build("gptj", 2), *inputs(), convert=False).graph_module.graph
    aten = torch.ops.aten
    strided = [n for n in graph.nodes if n.target == aten.slice.Tensor and len(n.args) > 4 and n.args[4] != 1]
    # strided slices only reorder the cos/sin tables, never a head chunk
    assert strided and not any(reads_projection(n.args[0]) for n in strided), [n.format_node() for n in strided]
