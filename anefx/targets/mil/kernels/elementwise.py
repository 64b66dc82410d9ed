"""Elementwise MIL ops: unary math, binary arithmetic and comparisons, activations, ``softmax``, ``cast``.

Semantics as coremltools' ``mil/ops/defs/iOS15/elementwise_unary.py``, ``elementwise_binary.py`` and
``activation.py`` (and their iOS17 versions, which only widen the dtypes). Binary ops broadcast like
numpy. Comparisons and logical ops give ``bool``; ``cast`` returns its input unchanged and the
interpreter converts it to the declared dtype (floats to integers truncate toward zero, as numpy's
``astype`` does in coremltools' ``value_inference``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anefx.targets.mil.kernels.base import Args, channel_view, to_float, to_int


def _unary(fn):
    def kernel(a: Args):
        return fn(a.x)

    kernel.__name__ = getattr(fn, "__name__", "unary")
    return kernel


def _binary(fn):
    def kernel(a: Args):
        return fn(a.x, a.y)

    kernel.__name__ = getattr(fn, "__name__", "binary")
    return kernel


def real_div(a: Args):
    return torch.true_divide(a.x, a.y)  # integer inputs: the quotient truncates to the declared int dtype


def floor_div(a: Args):
    return torch.div(a.x, a.y, rounding_mode="floor")


def identity(a: Args):
    return a.x


def cast(a: Args):
    return a.x  # the interpreter converts to the declared dtype (``a.dtype``)


def clip(a: Args):
    return torch.clamp(a.x, to_float(a.alpha), to_float(a.beta))


def threshold(a: Args):
    return torch.clamp(a.x, min=to_float(a.alpha))


def relu6(a: Args):
    return torch.clamp(a.x, 0.0, 6.0)


def clamped_relu(a: Args):
    alpha, beta = to_float(a.alpha), to_float(a.beta)
    return torch.clamp(a.x, 0.0, beta) + torch.clamp(torch.clamp(a.x, max=0.0) * alpha, max=beta)


def elu(a: Args):
    return torch.where(a.x < 0, to_float(a.alpha) * torch.expm1(a.x), a.x)


def leaky_relu(a: Args):
    return torch.where(a.x < 0, to_float(a.alpha) * a.x, a.x)


def linear_activation(a: Args):
    return to_float(a.alpha) * a.x + to_float(a.beta)


def prelu(a: Args):
    alpha = channel_view(a.alpha, a.x.dim())
    return torch.clamp(a.x, min=0.0) + torch.clamp(a.x, max=0.0) * alpha


def scaled_tanh(a: Args):
    return to_float(a.alpha) * torch.tanh(to_float(a.beta) * a.x)


def sigmoid_hard(a: Args):
    return torch.clamp(to_float(a.alpha) * a.x + to_float(a.beta), 0.0, 1.0)


def silu(a: Args):
    return a.x * torch.sigmoid(a.x)


def softplus(a: Args):
    return torch.log1p(torch.exp(-a.x.abs())) + torch.clamp(a.x, min=0.0)


def softplus_parametric(a: Args):
    rank = a.x.dim()
    alpha, beta = channel_view(a.alpha, rank), channel_view(a.beta, rank)
    return alpha * torch.log1p(torch.exp(a.x * beta))


def softsign(a: Args):
    return a.x / (1 + a.x.abs())


def thresholded_relu(a: Args):
    return torch.where(a.x < to_float(a.alpha), torch.zeros_like(a.x), a.x)


def gelu(a: Args):
    mode = a.mode or "EXACT"
    if mode == "TANH_APPROXIMATION":
        return F.gelu(a.x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return a.x * torch.sigmoid(1.702 * a.x)
    return F.gelu(a.x)


def softmax(a: Args):
    return torch.softmax(a.x, dim=to_int(a.axis, -1))


def square(a: Args):
    return a.x * a.x


def exp2(a: Args):
    return torch.exp2(a.x)


def rsqrt(a: Args):
    return torch.rsqrt(a.x + to_float(a.epsilon, 1e-12))


def inverse(a: Args):
    return torch.reciprocal(a.x + to_float(a.epsilon, 1e-4))


def log(a: Args):
    return torch.log(a.x + to_float(a.epsilon, 1e-45))


def erf(a: Args):
    return torch.erf(a.x)


KERNELS = {
    # unary math (iOS15 elementwise_unary)
    "abs": _unary(torch.abs),
    "acos": _unary(torch.acos),
    "asin": _unary(torch.asin),
    "atan": _unary(torch.atan),
    "atanh": _unary(torch.atanh),
    "ceil": _unary(torch.ceil),
    "cos": _unary(torch.cos),
    "cosh": _unary(torch.cosh),
    "erf": erf,
    "exp": _unary(torch.exp),
    "exp2": exp2,
    "floor": _unary(torch.floor),
    "inverse": inverse,
    "log": log,
    "logical_not": _unary(torch.logical_not),
    "round": _unary(torch.round),  # half to even, as numpy's round in value_inference
    "rsqrt": rsqrt,
    "sign": _unary(torch.sign),
    "sin": _unary(torch.sin),
    "sinh": _unary(torch.sinh),
    "sqrt": _unary(torch.sqrt),
    "square": square,
    "tan": _unary(torch.tan),
    "tanh": _unary(torch.tanh),
    "threshold": threshold,
    "clip": clip,
    "cast": cast,
    "identity": identity,
    # binary (iOS15 elementwise_binary), numpy broadcasting
    "add": _binary(torch.add),
    "sub": _binary(torch.sub),
    "mul": _binary(torch.mul),
    "real_div": real_div,
    "floor_div": floor_div,
    "mod": _binary(torch.remainder),  # the sign of the divisor, as Python's % in value_inference
    "pow": _binary(torch.pow),
    "maximum": _binary(torch.maximum),
    "minimum": _binary(torch.minimum),
    "equal": _binary(torch.eq),
    "not_equal": _binary(torch.ne),
    "greater": _binary(torch.gt),
    "greater_equal": _binary(torch.ge),
    "less": _binary(torch.lt),
    "less_equal": _binary(torch.le),
    "logical_and": _binary(torch.logical_and),
    "logical_or": _binary(torch.logical_or),
    "logical_xor": _binary(torch.logical_xor),
    # activations (iOS15 activation)
    "relu": _unary(torch.relu),
    "relu6": relu6,
    "sigmoid": _unary(torch.sigmoid),
    "sigmoid_hard": sigmoid_hard,
    "silu": silu,
    "gelu": gelu,
    "elu": elu,
    "leaky_relu": leaky_relu,
    "linear_activation": linear_activation,
    "prelu": prelu,
    "clamped_relu": clamped_relu,
    "scaled_tanh": scaled_tanh,
    "softplus": softplus,
    "softplus_parametric": softplus_parametric,
    "softsign": softsign,
    "thresholded_relu": thresholded_relu,
    "softmax": softmax,
}
