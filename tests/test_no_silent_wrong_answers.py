"""Issue 11's done-when cases on real transformers models: what anefx validates and ships is what
the model computes, for inputs the compile never saw."""

import torch

import anefx
from anefx.graph import call
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
