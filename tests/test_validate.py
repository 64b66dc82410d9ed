import math

import pytest
import torch
import torch.nn.functional as F

from anefx.driver.validate import (
    DEFAULT_TOLERANCES,
    STRESS_PATTERNS,
    MaskLike,
    Tolerance,
    ValidationOptions,
    Validator,
    compare,
    mask_like,
    random_like,
    stress_mask,
)


def test_compare_within_and_beyond_tolerance():
    opts = ValidationOptions()
    a = torch.ones(4)
    assert compare([a + 5e-5], [a], opts).ok
    res = compare([a + 1e-3], [a], opts)
    assert not res.ok and "differs by up to" in res.message
    assert math.isclose(res.max_abs_error, 1e-3, rel_tol=1e-3)


def test_per_dtype_tolerances_are_configurable():
    a = torch.ones(4, dtype=torch.float16)
    assert compare([a + 0.005], [a], ValidationOptions()).ok  # fp16 default 1e-2
    strict = ValidationOptions(tolerances={torch.float16: Tolerance(1e-4, 0.0)})
    assert not compare([a + 0.005], [a], strict).ok
    assert DEFAULT_TOLERANCES[torch.float32].rtol == 1e-4


def test_tolerance_is_relative_to_the_output_scale():
    """A fixed atol=1e-4 would accept any answer for outputs of size 1e-5 (a 50k-way softmax)."""
    opts = ValidationOptions()
    p = torch.softmax(torch.randn(50_000, generator=torch.Generator().manual_seed(0)), 0)
    assert float(p.max()) < 1e-2 and float(p.median()) < 1e-4
    wrong = p.flip(0)  # the right values at the wrong tokens
    res = compare([wrong], [p], opts)
    assert not res.ok and res.max_rel_error > 0.1 and "of its scale" in res.message
    assert compare([p * (1 + 1e-6)], [p], opts).ok  # float noise is still fine
    big = torch.randn(64) * 1e4  # and large outputs are held to their scale, not to 1e-4
    assert compare([big + 1e-2], [big], opts).ok
    assert not compare([big + 1.0], [big], opts).ok


def test_shape_dtype_and_nan_mismatches():
    opts = ValidationOptions()
    assert "expected float32[3]" in compare([torch.ones(2)], [torch.ones(3)], opts).message
    nan = torch.tensor([float("nan"), 1.0])
    assert compare([nan.clone()], [nan], opts).ok
    assert compare([torch.tensor([0.0, 1.0])], [nan], opts).ok  # torch defines nothing there
    assert not compare([torch.tensor([float("nan"), 1.0])], [torch.tensor([0.0, 1.0])], opts).ok
    inf = torch.tensor([float("-inf"), 1.0])
    assert compare([inf.clone()], [inf], opts).ok
    assert not compare([torch.tensor([-1e4, 1.0])], [inf], opts).ok
    assert not compare([torch.tensor([1, 2])], [torch.tensor([1, 3])], opts).ok


def test_random_inputs_stay_in_the_example_domain():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 7, 9, 5]])
    r = random_like(ids, gen)
    assert r.dtype == ids.dtype and r.shape == ids.shape
    assert int(r.min()) >= 3 and int(r.max()) <= 9
    mask = torch.ones(1, 8, dtype=torch.bool)
    assert torch.equal(random_like(mask, gen), mask)
    x = torch.randn(2, 3) * 10 + 4
    y = random_like(x, gen)
    assert y.dtype == x.dtype and not torch.equal(x, y)
    # positions count up by one: a run of consecutive positions in the example's range, never repeats
    positions = torch.arange(4, 20, dtype=torch.int32).reshape(2, 8)
    runs = {tuple(row) for _ in range(20) for row in random_like(positions, gen).tolist()}
    assert len(runs) > 1 and all(list(r) == list(range(r[0], r[0] + 8)) and 4 <= r[0] <= 12 for r in runs)


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(2, 4)

    def forward(self, types, keep):
        return self.emb(types) * keep.unsqueeze(-1)


def test_mask_like_inputs_are_recognised_and_ids_are_not():
    assert mask_like(torch.ones(1, 8, dtype=torch.bool)) == MaskLike(True, False)
    assert mask_like(torch.zeros(1, 8, dtype=torch.bool)) == MaskLike(False, True)  # masked_fill polarity
    assert mask_like(torch.ones(2, 8, dtype=torch.long)) == MaskLike(1, 0)
    assert mask_like(torch.tensor([[0, 5, 3]])) is None  # ids
    additive = torch.zeros(1, 1, 4, 4).masked_fill(torch.ones(4, 4).triu(1).bool(), torch.finfo(torch.float32).min)
    assert mask_like(additive) == MaskLike(0.0, torch.finfo(torch.float32).min)
    assert mask_like(torch.zeros(1, 4)) is None and mask_like(torch.randn(1, 4)) is None
    assert mask_like(torch.ones(1, 1, dtype=torch.long)) is None  # nothing to pad
    # an integer 0/1 input used as an index (token types) is an id: its domain is the table's
    import anefx

    cap = anefx.capture(_Embed(), (torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)))
    v = Validator(cap.graph_module, cap.flat_inputs, ValidationOptions())
    assert list(v.masks) == [1]
    assert v.set_names[2:] == [f"stress: masks with {p.replace('_', ' ')}" for p in STRESS_PATTERNS]
    assert all(bool((s[0] == 0).all()) for s in v.input_sets)  # the ids stay in their domain
    # the stress sets vary the mask only: the other inputs are the random set's own tensors
    assert all(s[0] is v.input_sets[1][0] and s[1] is not v.input_sets[1][1] for s in v.input_sets[2:])


@pytest.mark.parametrize("pattern", [*STRESS_PATTERNS, "holes"])
def test_stress_masks(pattern):
    gen = torch.Generator().manual_seed(1)
    for example_mask in (torch.ones(3, 16, dtype=torch.long), torch.zeros(2, 1, 5, 16)):
        spec = mask_like(example_mask) or MaskLike(0.0, -1e9)
        m = stress_mask(example_mask, spec, pattern, gen)
        assert m.shape == example_mask.shape and m.dtype == example_mask.dtype
        keep = (m == spec.keep).reshape(-1, 16)
        assert bool(keep.any(-1).all())  # every row keeps a key
        assert bool((~keep).any(-1).all()) or pattern == "holes"  # and masks some
        if pattern == "one_kept":
            assert bool((keep.sum(-1) == 1).all())
        if pattern == "right_padding":
            assert bool(keep[:, 0].all()) and not bool(keep[:, -1].any())
        if pattern == "left_padding":
            assert bool(keep[:, -1].all()) and not bool(keep[:, 0].any())


class _Causal(torch.nn.Module):
    def forward(self, x, keep):
        m = keep.bool()[:, None, None, :] & torch.ones(x.shape[2], x.shape[2], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(x, x, x, attn_mask=m)


def test_rows_whose_keys_are_all_masked_are_not_compared_the_rest_is():
    """Left padding in a causal model masks every key of the first rows: torch returns zeros there,
    a finite additive mask the mean of V; neither means anything, so those rows are not compared."""
    import anefx

    x = torch.randn(1, 2, 8, 4)
    cap = anefx.capture(_Causal(), (x, torch.ones(1, 8, dtype=torch.long)))
    v = Validator(cap.graph_module, cap.flat_inputs, ValidationOptions())
    k = v.set_names.index("stress: masks with left padding")
    keep, out = v.input_sets[k][1], v.references[k][0]
    dead = int((keep[0] == 0).sum())  # the padded rows see no key
    undefined = v.undefined[k][0]
    assert bool(undefined[:, :, :dead].all()) and not bool(undefined[:, :, dead:].any())
    other = out.clone()
    other[:, :, :dead] = 123.0  # any value in the dead rows is as good
    assert compare([other], [out], v.options, v.undefined[k]).ok
    other[:, :, dead] += 1e-3  # but a live row must match
    assert not compare([other], [out], v.options, v.undefined[k]).ok


class _Masked(torch.nn.Module):
    def forward(self, x, keep):
        return x * keep.unsqueeze(-1).to(x.dtype) + 1.0


def _ignore_mask(gm):
    """A wrong rewrite that the example set cannot see (its mask keeps everything): ``x * m`` -> ``x``."""
    gm = __import__("anefx.ir.graph", fromlist=["clone_graph_module"]).clone_graph_module(gm)
    mul = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    mul.replace_all_uses_with(mul.args[0])
    gm.graph.erase_node(mul)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def test_example_mode_checks_passes_on_the_example_and_keeps_every_set():
    import anefx

    cap = anefx.capture(_Masked(), (torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.long)))
    example = Validator(cap.graph_module, cap.flat_inputs, ValidationOptions(mode="example"))
    numeric = Validator(cap.graph_module, cap.flat_inputs, ValidationOptions())
    # the same sets and references (the artifact check executes the program on all of them)
    assert example.set_names == numeric.set_names and len(example.references) == 2 + len(STRESS_PATTERNS)
    wrong = _ignore_mask(cap.graph_module)
    assert example.check(wrong).ok  # per pass: the example set only, whose mask keeps everything
    verdict = example.check(wrong, every_set=True)
    assert not verdict.ok and "[inputs: " in verdict.message
    assert not numeric.check(wrong).ok


def test_given_sets_with_references_computed_when_read():
    """A validator on sets made elsewhere (a chunk on its function's sets): the sets are the given
    tensors, the example's references are held, every other set's are the graph's outputs computed
    at each read; a graph wrong only off the example is caught by ``every_set`` and names the set."""
    import anefx

    cap = anefx.capture(_Masked(), (torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.long)))
    drawn = Validator(cap.graph_module, cap.flat_inputs, ValidationOptions(mode="example"))
    given = Validator(
        cap.graph_module,
        cap.flat_inputs,
        ValidationOptions(mode="example"),
        given=(drawn.set_names, drawn.input_sets, None),
    )
    assert all(a is b for s, t in zip(given.input_sets, drawn.input_sets) for a, b in zip(s, t))
    assert given.references[0] is given.references[0]  # held
    for k in range(1, len(drawn.references)):
        first, again = given.references[k], given.references[k]
        assert first[0] is not again[0] and torch.equal(first[0], again[0])
        assert torch.equal(first[0], drawn.references[k][0])
    wrong = _ignore_mask(cap.graph_module)
    assert given.check(wrong).ok
    verdict = given.check(wrong, every_set=True)
    assert not verdict.ok and "[inputs: random (masks with holes)]" in verdict.message
    given.keep_example_only()
    assert len(given.references) == len(given.input_sets) == 1 and given.check(wrong, every_set=True).ok
    changed = Validator(
        cap.graph_module,
        cap.flat_inputs,
        ValidationOptions(mode="example"),
        given=(drawn.set_names, drawn.input_sets, None),
    )
    _ = changed.references[1]
    mul = next(n for n in cap.graph_module.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    mul.target = torch.ops.aten.add.Tensor  # the reference changed in place: never read as a reference
    cap.graph_module.recompile()
    with pytest.raises(RuntimeError, match="changed in place"):
        _ = changed.references[1]
    with pytest.raises(ValueError, match="given input sets"):
        Validator(cap.graph_module, cap.flat_inputs, ValidationOptions(), given=(["example"], [], None))


def test_example_mode_pipeline_rolls_back_a_pass_only_other_sets_catch():
    import anefx
    from anefx.passes import Pass
    from anefx.passes.base import finish

    class IgnoresMask(Pass):
        """Drops the mask multiply: right on the example (all ones), wrong on the stress sets."""

        name = "ignores_mask"

        def run(self, gm, ctx):
            mul = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
            mul.replace_all_uses_with(mul.args[0])
            gm.graph.erase_node(mul)
            gm.graph.eliminate_dead_code()
            return finish(gm, True)

    x, keep = torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.long)
    pipeline = anefx.Pipeline.empty().append(IgnoresMask())
    compiled = anefx.compile(_Masked(), (x, keep), pipeline=pipeline, convert=False, validate="example")
    assert compiled.report.record("ignores_mask").rolled_back  # found by the rerun on every set
    padded = keep.clone()
    padded[0, 4:] = 0
    torch.testing.assert_close(compiled(x, padded), _Masked()(x, padded))
    lint = anefx.compile(_Masked(), (x, keep), pipeline=pipeline, convert=False, validate="lint")
    assert not lint.report.record("ignores_mask").rolled_back  # what example mode adds over lint


class _WritesInput(torch.nn.Module):
    def forward(self, x, cache):
        torch.ops.aten.add_.Tensor(cache, 1.0)  # an in-place write into an input (a cache updated in place)
        return torch.ops.aten.add.Tensor(x, cache)


class _Opaque(torch.nn.Module):
    def forward(self, cache):
        cache.mul_(2.0)
        return cache.sum(-1)


class _CallsOpaque(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Opaque()

    def forward(self, x, cache):
        return x + self.inner(cache)


def test_runs_never_change_shared_input_sets():
    """The stress sets share the random set's tensors: a graph writing into an input must not
    change them (cloned first), and a write the graph hides fails loudly instead of corrupting."""
    from anefx.driver.validate import InputMutationError, run_flat, written_inputs

    gm = torch.fx.symbolic_trace(_WritesInput())
    assert written_inputs(gm) == {1}
    x, cache = torch.randn(4), torch.zeros(4)
    torch.testing.assert_close(run_flat(gm, [x, cache])[0], x + 1)
    torch.testing.assert_close(run_flat(gm, [x, cache])[0], x + 1)  # not x + 2: the input kept its value
    assert bool((cache == 0).all())

    class Leaf(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, _Opaque) or super().is_leaf_module(m, qualname)

    root = _CallsOpaque()
    hidden = torch.fx.GraphModule(root, Leaf().trace(root))
    assert written_inputs(hidden) == set()  # a call_module: its write is not in the graph
    with pytest.raises(InputMutationError, match="cache"):
        run_flat(hidden, [torch.randn(4), torch.ones(4, 3)])


class _WritesItsState(torch.nn.Module):
    """A step whose eager forward writes into its (shared) state input."""

    def forward(self, x, state):
        state.mul_(2.0)
        return x + state


class _ReadsState(torch.nn.Module):
    def forward(self, x, state):
        return x * state


def test_building_a_function_that_writes_a_shared_example_input_fails():
    """Functions may share example tensors (an encoder-decoder's prefill and decode share one set
    of states): a function whose build writes into one would leave the next validated against
    changed values, so the build stops and names it."""
    from anefx.core.options import CompileOptions, prepare
    from anefx.core.stages import FunctionSpec, ProgramRequest, build
    from anefx.driver.events import Events
    from anefx.ir.errors import CaptureError

    state = torch.ones(4)
    plan = prepare(CompileOptions(convert=False, never_worse=False, pipeline=__import__("anefx").Pipeline.empty()))
    fine = ProgramRequest(
        [
            FunctionSpec("a", _ReadsState(), (torch.randn(4), state)),
            FunctionSpec("b", _ReadsState(), (torch.randn(4), state)),
        ]
    )
    assert set(build(fine, plan, Events()).functions) == {"a", "b"}
    writes = ProgramRequest(
        [
            FunctionSpec("a", _WritesItsState(), (torch.randn(4), state)),
            FunctionSpec("b", _ReadsState(), (torch.randn(4), state)),
        ]
    )
    with pytest.raises(CaptureError, match=r"building a wrote into the example inputs \['a input #1', 'b input #1'\]"):
        build(writes, plan, Events())
