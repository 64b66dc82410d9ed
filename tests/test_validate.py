import math

import torch

from anefx.validate import DEFAULT_TOLERANCES, Tolerance, ValidationOptions, compare, random_like


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
    assert DEFAULT_TOLERANCES[torch.float32].atol == 1e-4


def test_shape_dtype_and_nan_mismatches():
    opts = ValidationOptions()
    assert "expected float32[3]" in compare([torch.ones(2)], [torch.ones(3)], opts).message
    nan = torch.tensor([float("nan"), 1.0])
    assert compare([nan.clone()], [nan], opts).ok
    assert not compare([torch.tensor([float("nan"), 1.0])], [torch.tensor([0.0, 1.0])], opts).ok
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
