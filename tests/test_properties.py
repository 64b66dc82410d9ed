"""Property tests: random graphs of linear / matmul / permute / transpose / reshape / add / mul / relu
/ layer_norm / softmax / concat, with random shapes, through every pass.

Properties: every pass keeps the graph valid and its outputs equal (no pass is rolled back on a valid
model); the layout passes never add a transpose of an activation; the default pipeline is
idempotent. ``HYPOTHESIS_PROFILE=thorough`` (``make test-props``) runs 2,000 examples; CI runs a few.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import anefx
from anefx.graph import is_constant

OPS = ["linear", "matmul_param", "permute", "transpose", "reshape", "add", "mul", "relu", "layer_norm",
       "softmax", "concat", "act_matmul"]  # fmt: skip


class RandomNet(nn.Module):
    """Applies a drawn program to a (B, S, C) input, keeping every intermediate value valid."""

    def __init__(self, program, shape, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.program = []
        self.mods = nn.ModuleList()
        b, s, c = shape
        for op, arg in program:
            if op in ("linear", "matmul_param"):
                out = arg
                if op == "linear":
                    self.mods.append(nn.Linear(c, out, bias=bool(seed % 2)))
                else:
                    m = nn.Module()
                    m.w = nn.Parameter(torch.randn(c, out, generator=gen) / c**0.5)
                    self.mods.append(m)
                self.program.append((op, len(self.mods) - 1))
                c = out
            elif op == "layer_norm":
                self.mods.append(nn.LayerNorm(c))
                self.program.append((op, len(self.mods) - 1))
            elif op in ("permute", "transpose"):
                self.program.append((op, None))
                s, c = c, s
            elif op == "reshape":
                total = s * c
                new_c = arg if total % arg == 0 else c
                self.program.append((op, (total // new_c, new_c)))
                s, c = total // new_c, new_c
            elif op == "concat":
                self.program.append((op, None))
                c = 2 * c
            elif op == "act_matmul":
                self.program.append((op, None))  # softmax(x x^T) x keeps the shape
            else:
                self.program.append((op, arg))
        self.out_shape = (b, s, c)

    def forward(self, x):
        first = x
        for op, arg in self.program:
            if op == "linear":
                x = self.mods[arg](x)
            elif op == "matmul_param":
                x = x @ self.mods[arg].w
            elif op == "layer_norm":
                x = self.mods[arg](x)
            elif op == "permute":
                x = x.permute(0, 2, 1)
            elif op == "transpose":
                x = x.transpose(1, 2)
            elif op == "reshape":
                x = x.reshape(x.shape[0], *arg)
            elif op == "add":
                x = x + (first if first.shape == x.shape else x)
            elif op == "mul":
                x = x * arg
            elif op == "relu":
                x = torch.relu(x)
            elif op == "softmax":
                x = torch.softmax(x, dim=arg)
            elif op == "concat":
                x = torch.cat([x, torch.relu(x)], dim=-1)
            elif op == "act_matmul":
                x = torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x
        return x


@st.composite
def nets(draw):
    shape = (draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 4])), draw(st.sampled_from([2, 4, 6, 8])))
    program = []
    for op in draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=8)):
        arg = None
        if op in ("linear", "matmul_param"):
            arg = draw(st.sampled_from([2, 4, 8]))
        elif op == "reshape":
            arg = draw(st.sampled_from([1, 2, 4]))
        elif op == "mul":
            arg = draw(st.sampled_from([0.5, -2.0]))
        elif op == "softmax":
            arg = draw(st.sampled_from([-1, 1]))
        program.append((op, arg))
    seed = draw(st.integers(0, 1000))
    return RandomNet(program, shape, seed).eval(), shape


def activation_permutes(gm) -> int:
    aten = torch.ops.aten
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in (aten.permute.default, aten.transpose.int) and not is_constant(n)
    )


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(nets())
def test_passes_keep_random_graphs_valid_and_equal(case):
    model, shape = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    cap = anefx.capture(model, (x,))
    pipeline = anefx.Pipeline.default()
    gm = cap.graph_module
    for p in pipeline.passes:
        before = activation_permutes(gm)
        res = anefx.Pipeline((p,)).run(gm, cap.flat_inputs, reference_outputs=cap.reference_outputs)
        rec = res.records[0]
        assert not rec.rolled_back, f"{p.name} broke {model.program}: {rec.error}"
        gm = res.graph_module
        gm.graph.lint()
        if p.name in ("to_bc1s", "fold_transposes"):
            assert activation_permutes(gm) <= before, f"{p.name} added transposes to {model.program}"
    torch.testing.assert_close(gm(x), model(x), atol=1e-4, rtol=1e-4)
    again = pipeline.run(gm, cap.flat_inputs)
    assert not [r.name for r in again.records if r.modified], f"not idempotent on {model.program}"
