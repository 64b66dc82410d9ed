"""Issue 11's done-when cases on real transformers models: what anefx validates and ships is what
the model computes, for inputs the compile never saw."""

import torch

import anefx
from anefx.driver.validate import run_flat
from anefx.ir.graph import call
from anefx.passes import Pass
from anefx.passes.base import finish
from helpers import example


class DropAttentionMask(Pass):
    """A wrong pass: every use of the ``attention_mask`` input becomes an all-ones tensor."""

    name = "drop_attention_mask"

    def run(self, gm, ctx):
        mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and "mask" in n.name)
        users = list(mask.users)
        with gm.graph.inserting_after(mask):
            ones = call(gm.graph, torch.ops.aten.ones_like.default, (mask,))
        for u in users:
            u.replace_input_with(mask, ones)
        return finish(gm, True)


def test_a_pass_that_drops_the_attention_mask_is_rolled_back():
    model, args, kwargs = example("bert")
    assert bool(kwargs["attention_mask"].all())  # the example keeps every position
    compiled = anefx.compile(
        model, args, kwargs, pipeline=anefx.Pipeline.default().append(DropAttentionMask()), convert=False
    )
    rec = compiled.report.record("drop_attention_mask")
    assert rec.rolled_back and "masks with" in rec.error
    padded = kwargs["attention_mask"].clone()
    padded[:, -7:] = 0  # padding the compile never saw
    got = compiled(*args, attention_mask=padded).last_hidden_state
    want = model(*args, attention_mask=padded).last_hidden_state
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def _reinit(model):
    """Seeded weights with nothing zero or identity (transformers zeroes biases and position tables)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p)
                if "norm" in name and name.endswith("weight")
                else 0.1 * torch.randn_like(p)
            )
    return model.eval()


def _converter_input_error(compiled, model, images):
    """Largest error, relative to the output's scale, of the graph handed to coremltools."""
    handed = compiled.artifact.package.converter_input
    worst = 0.0
    for x in images:
        got = run_flat(handed, [x])[0]
        want = model(pixel_values=x).last_hidden_state
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def test_beit_graph_handed_to_coremltools_is_the_model():
    from transformers import BeitConfig, BeitModel

    cfg = BeitConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, use_relative_position_bias=True,
    )  # fmt: skip
    model = _reinit(BeitModel(cfg, add_pooling_layer=False))
    x = torch.randn(1, 3, 32, 32)
    # the rewritten graph (never_worse=False): with its relative-position attention left as it is, the
    # convs cost more transposes than stock, so the default compile keeps BEiT in its original form
    compiled = anefx.compile(model, (x,), never_worse=False)
    images = [x, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))]
    assert _converter_input_error(compiled, model, images) < 1e-4
    conv = compiled.report.conversion
    assert float(conv["converter_input_max_rel_error"]) < 1e-4
    assert compiled.op_histogram()["conv"] >= 12  # the projections still went to 1x1 convs


def test_swin_compiles_and_converts():
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    model = _reinit(SwinModel(cfg, add_pooling_layer=False))
    x = torch.randn(1, 3, 32, 32)
    compiled = anefx.compile(model, (x,))
    assert _converter_input_error(compiled, model, [x]) < 1e-4
    assert compiled.op_histogram()["conv"] >= 1
