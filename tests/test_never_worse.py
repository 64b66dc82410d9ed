"""Issue 15, item 2: never worse than stock, per region (the guard of ``anefx.driver.guard``), judged
on real MIL op counts of the stock and the anefx conversions."""

import pytest
import torch
from torch import nn

import anefx
from anefx.driver.guard import find_regions
from helpers import example

torch.manual_seed(0)


def _layout(hist) -> int:
    return hist.get("transpose", 0) + hist.get("reshape", 0)


def _reinit(model: nn.Module) -> nn.Module:
    """Nothing zero or identity: weights and biases random, norm weights around 1 +- 0.2, batch-norm
    statistics away from (0, 1)."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        norm_weight = p.dim() == 1 and name.endswith("weight")
        nn.init.normal_(p, mean=1.0 if norm_weight else 0.0, std=0.2)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class EinsumProjections(nn.Module):
    """The issue's example: projections written as ``einsum('bsd,de->bse', x, W)`` on (B, S, C)."""

    def __init__(self, d=64, e=128):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.w_in = nn.Parameter(torch.empty(d, e))
        self.w_out = nn.Parameter(torch.empty(e, d))

    def forward(self, x):
        h = nn.functional.gelu(torch.einsum("bsd,de->bse", self.norm(x), self.w_in))
        return x + torch.einsum("bse,ed->bsd", h, self.w_out)


class Attention(nn.Module):
    """A pre-norm attention + MLP block on tokens (B, N, C)."""

    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        b, n, c = x.shape
        y = self.norm1(x)
        q, k, v = (m(y).view(b, n, self.heads, c // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class LinearBN(nn.Module):
    """LeViT's Linear followed by BatchNorm1d over the flattened tokens."""

    def __init__(self, a, b):
        super().__init__()
        self.linear = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class LeViTMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.up, self.down = LinearBN(c, 2 * c), LinearBN(2 * c, c)

    def forward(self, x):
        return x + self.down(nn.functional.hardswish(self.up(x)))


class Hybrid(nn.Module):
    """A hybrid conv/attention vision model: a conv stem in NCHW, flattened to tokens, attention
    blocks, a depthwise conv between stages, then LeViT-style MLP blocks (linear + batch norm on
    the flattened tokens)."""

    def __init__(self, c=32, heads=4, attention_blocks=2, mlp_blocks=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.GELU())
        self.attention = nn.ModuleList(Attention(c, heads) for _ in range(attention_blocks))
        self.mid = nn.Conv2d(c, c, 3, 1, 1, groups=c)
        self.mlp = nn.ModuleList(LeViTMLP(c) for _ in range(mlp_blocks))

    def forward(self, image):
        x = self.stem(image)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.attention:
            tokens = block(tokens)
        x = self.mid(tokens.transpose(1, 2).reshape(b, c, h, w))
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.mlp:
            tokens = block(tokens)
        return tokens


def _three(model, args, pipeline=None):
    """Stock conversion, anefx with the guard (the default) and the passes' own output."""
    stock = anefx.compile(model, args, pipeline=anefx.Pipeline.empty(), validate="off")
    guarded = anefx.compile(model, args, pipeline=pipeline)
    raw = anefx.compile(model, args, pipeline=pipeline, never_worse=False)
    return stock, guarded, raw


def test_einsum_projections_are_never_worse_than_stock():
    model, x = _reinit(EinsumProjections()), torch.randn(2, 16, 64)
    stock, guarded, raw = _three(model, (x,))
    s, g, r = stock.op_histogram(), guarded.op_histogram(), raw.op_histogram()
    assert _layout(r) == _layout(s) + 2, (r, s)  # the passes alone: a transpose in and one out
    assert _layout(g) <= _layout(s), (g, s)
    info = guarded.report.guard
    assert info["stock"] == {"transpose": 0, "reshape": 0} and info["reruns"] == 1 and not info["worse_than_stock"]
    (kept,) = info["kept"]
    assert {(k["pass"], k["op"]) for k in kept["sites"]} >= {("linear_to_conv", "aten.einsum")}
    assert all(k["where"].startswith(__file__) for k in kept["sites"])
    assert (kept["stock"], kept["anefx"], kept["after"]) == (0, 2, 0)
    assert "kept region 0 in its original form" in str(guarded.report)
    # what ships computes the model, on the example and on inputs the compile never saw
    for inputs in (x, torch.randn(2, 16, 64) * 3):
        torch.testing.assert_close(guarded(inputs), model(inputs), atol=1e-5, rtol=1e-5)
    assert guarded.report.conversion["converter_input_max_abs_error"] is not None


def test_hybrid_keeps_the_worse_region_and_rewrites_the_attention():
    """Without ``token_batch_norm`` the LeViT MLPs' batch norms over flattened tokens force their
    tokens out of (B, C, 1, S): those regions come out worse and are kept."""
    model, image = _reinit(Hybrid()), torch.randn(1, 3, 16, 16)
    stock, guarded, raw = _three(model, (image,), anefx.Pipeline.default().without("token_batch_norm"))
    s, g, r = stock.op_histogram(), guarded.op_histogram(), raw.op_histogram()
    assert _layout(g) <= _layout(s) and _layout(g) < _layout(r), (s, g, r)
    # the attention region stays rewritten: per-head einsums, 12 projections + 2 convs of the model
    assert g["einsum"] == r["einsum"] == 16 and "matmul" not in g and s["matmul"] == 4, (g, r, s)
    assert g["conv"] == 14 and r["conv"] == 18, (g, r)
    # the LeViT MLPs are kept as the stock conversion has them: their 4 linears (stock: all 16)
    assert g["linear"] == 4 and s["linear"] == 16 and "linear" not in r, (g, r, s)
    kept = guarded.report.guard["kept"]
    assert not guarded.report.guard["worse_than_stock"]
    sites = [site for region in kept for site in region["sites"]]
    assert {x["site"] for x in sites} == {n.name for n in _levit_linears(guarded)}
    assert all(region["after"] <= region["stock"] < region["anefx"] for region in kept), kept
    text = str(guarded.report)
    assert text.count("kept region") == len(kept) >= 1
    for inputs in (image, torch.randn(1, 3, 16, 16) * 2):
        torch.testing.assert_close(guarded(inputs), model(inputs), atol=1e-4, rtol=1e-4)


def test_hybrid_comes_out_whole_with_batch_norm_on_tokens():
    """With ``token_batch_norm`` (the default) the whole hybrid runs in (B, C, 1, S): attention per
    head, the LeViT projections as convs with their batch norms folded into them by coremltools."""
    model, image = _reinit(Hybrid()), torch.randn(1, 3, 16, 16)
    stock = anefx.compile(model, (image,), pipeline=anefx.Pipeline.empty(), validate="off")
    compiled = anefx.compile(model, (image,))
    s, g = stock.op_histogram(), compiled.op_histogram()
    assert compiled.report.guard["kept"] == [] and compiled.report.record("token_batch_norm").stats["rewritten"] == 4
    assert _layout(g) * 4 < _layout(s), (g, s)
    assert "linear" not in g and "matmul" not in g and "batch_norm" not in g and s["batch_norm"] == 4, g
    assert g["einsum"] == 16 and g["conv"] == 18, g
    for inputs in (image, torch.randn(1, 3, 16, 16) * 2):
        torch.testing.assert_close(compiled(inputs), model(inputs), atol=1e-4, rtol=1e-4)


def _levit_linears(compiled):
    """The captured ``linear`` nodes of the LeViT MLPs (module path ``mlp.*``)."""
    found = []
    for n in compiled.captured.graph_module.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if n.target == torch.ops.aten.linear.default and any(path.startswith("mlp.") for path, _ in stack.values()):
            found.append(n)
    assert len(found) == 4
    return found


def test_a_model_already_better_than_stock_costs_one_count():
    """DistilBERT: anefx removes layout changes everywhere, so the guard only counts (no re-run)."""
    model, args, kwargs = example("distilbert_small")
    steps = []
    compiled = anefx.compile(model, args, kwargs, convert=False, progress=steps.append)
    info = compiled.report.guard
    assert info["reruns"] == 0 and info["kept"] == [] and info["regions"] >= 1
    assert sum(info["anefx"].values()) < sum(info["stock"].values())
    assert not [e for e in steps if e.path[-1] == "rerun"]  # the guard only counted
    first = anefx.Pipeline.default().names[0]
    assert [e.kind for e in steps if e.path[-1] == first] == ["step"]  # the passes ran once
    assert [e.name for e in steps if e.kind == "end"] == ["capture", "passes.guard", "passes"]


def test_refused_sites_keep_their_original_form():
    model, args, _ = example("mlp_block")
    cap = anefx.capture(model, args)
    linears = [n.name for n in cap.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    res = anefx.Pipeline.default().run(cap.graph_module, cap.flat_inputs, refused={"linear_to_conv": {linears[0]}})
    left = [n.name for n in res.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert left == [linears[0]]
    assert [s.name for s in res.sites["linear_to_conv"]] == linears  # refused sites are still declared
    assert not res.records[anefx.Pipeline.default().names.index("linear_to_conv")].excluded_sites


@pytest.mark.parametrize("attention_blocks, mlp_blocks", [(2, 0), (0, 2)])
def test_regions_are_split_by_the_models_convolutions(attention_blocks, mlp_blocks):
    """The attention blocks and their residual stream make one region; so do the LeViT blocks' up
    projections (on the residual stream), while each down projection sits between two batch norms:
    a region of its own (without ``token_batch_norm``, whose sites, the batch norms, join them)."""
    model = _reinit(Hybrid(attention_blocks=attention_blocks, mlp_blocks=mlp_blocks))
    cap = anefx.capture(model, (torch.randn(1, 3, 16, 16),))
    res = anefx.Pipeline.default().without("token_batch_norm").run(cap.graph_module, cap.flat_inputs)
    regions = find_regions(cap.graph_module, res.sites)
    assert len(regions) == (1 if attention_blocks else 1 + mlp_blocks)
    assert {p for r in regions for p, _ in r.sites} >= {"linear_to_conv"}


class LSTMHead(nn.Module):
    """An LSTM read by a linear: stock coremltools cannot convert it, anefx's conv form can."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y, _ = self.lstm(x)
        return torch.relu(self.fc(y))


def test_a_kept_form_that_does_not_convert_falls_back_to_the_passes_output():
    model, x = _reinit(LSTMHead()), torch.randn(1, 8, 16)
    with pytest.raises(anefx.AnefxError, match="Item selection"):
        anefx.compile(model, (x,), pipeline=anefx.Pipeline.empty())
    compiled = anefx.compile(model, (x,))
    info = compiled.report.guard
    assert "does not convert" in info["fallback"] and len(info["kept"]) == 1
    assert compiled.op_histogram()["conv"] == 1
    assert "would keep region 0" in str(compiled.report)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


class _RoundTrip(anefx.Pass):
    """A user pass without sites that leaves a transpose pair on every input (equivalent, so it
    validates; worse, and the guard cannot refuse what has no site)."""

    name = "round_trip"

    def run(self, gm, ctx):
        from anefx.ir.graph import call

        graph = gm.graph
        for x in [n for n in graph.nodes if n.op == "placeholder"]:
            users = list(x.users)
            with graph.inserting_after(x):
                there = call(graph, torch.ops.aten.permute.default, (x, [0, 2, 1]))
            with graph.inserting_after(there):
                back = call(graph, torch.ops.aten.permute.default, (there, [0, 2, 1]))
            for u in users:
                u.replace_input_with(x, back)
        return anefx.passes.base.finish(gm, True)


def test_still_worse_after_the_refusals_ships_the_stock_form():
    model, args, _ = example("mlp_block")
    stock = anefx.compile(model, args, pipeline=anefx.Pipeline.empty(), validate="off")
    compiled = anefx.compile(model, args, pipeline=anefx.Pipeline.default().append(_RoundTrip()))
    info = compiled.report.guard
    assert info["shipped"] == "stock" and not info["worse_than_stock"]
    assert sum(info["worse_counts"].values()) > sum(info["stock"].values())
    assert [r.name for r in compiled.report.records] == ["canonicalize", "fold_constants", "fp16_mask_values"]
    assert compiled.op_histogram() == stock.op_histogram()
    assert "shipped the stock form of the validated captured graph" in str(compiled.report)
    assert "WORSE" not in str(compiled.report)
    x = torch.randn(*args[0].shape) * 2
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind, layout_changes",
    [("roformer", 4), ("falcon_mqa", 4), ("modernbert", None)],  # None: not rewritten
)
def test_unusual_attention_is_rewritten_or_ships_stock(kind, layout_changes):
    """RoFormer's interleaved rotary (``stack(...).reshape_as(x)``) and Falcon's multi-query
    ``[..., [-2], :]`` slices are per head (one K transpose per attention left); ModernBERT's
    ``view(B, S, 3, H, D).unbind(2)`` is not matched yet: its conv projections alone would be worse
    than stock outside any region the guard can refuse, so the stock form ships (it used to ship the
    worse graph)."""
    model, args, kwargs = example("rotary_or_fused", kind=kind)
    compiled = anefx.compile(model, args, kwargs, convert=False)
    info = compiled.report.guard
    assert not info["worse_than_stock"] and "WORSE" not in str(compiled.report)
    if layout_changes is not None:
        assert compiled.report.record("attention_bc1s").stats["heads"] == 16 and info["kept"] == []
        assert sum(info["anefx"].values()) == layout_changes < sum(info["stock"].values()), info
    else:
        assert info["shipped"] == "stock" and "shipped the stock form" in str(compiled.report)
    ids = torch.randint(3, 1024, args[0].shape, generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(kwargs["attention_mask"])
    mask[:, -3:] = 0
    out = compiled(ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
