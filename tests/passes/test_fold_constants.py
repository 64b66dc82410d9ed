"""fold_constants never folds what reads a buffer the model mutates (issue 11, item 2)."""

import torch
from torch import nn

import anefx
from anefx.analysis.legalize import mutated_buffers


class Cache(nn.Module):
    """A KV-cache-like buffer updated in place (through a slice) and a step counter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 4, 3))
        self.register_buffer("step", torch.zeros(1))
        self.register_buffer("table", torch.arange(12.0).view(4, 3))  # read only: foldable

    def forward(self, x):
        old = self.cache * 2 + 1  # reads the buffer before the update: input independent
        self.cache[:, 1:3].add_(x)
        self.step += 1
        return old + x.sum() + self.table * 3, self.cache.clone() * self.step


def test_subgraphs_reading_mutated_buffers_stay():
    model = Cache()
    cap = anefx.capture(model, (torch.ones(1, 2, 3),))
    gm = cap.graph_module
    assert mutated_buffers(gm) == {"cache", "step"}
    res = anefx.Pipeline.from_names(["fold_constants"]).with_validation(mode="off").run(gm, cap.flat_inputs)
    out = res.graph_module
    assert res.records[0].stats == {"folded": 1}  # table * 3 only
    for name in ("cache", "step"):  # capture ran the model once: start both from zero state
        getattr(out, name).zero_()
    eager = Cache()
    for call in range(3):
        x = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(call))
        for got, want in zip(out(x), eager(x), strict=True):
            torch.testing.assert_close(got, want)
