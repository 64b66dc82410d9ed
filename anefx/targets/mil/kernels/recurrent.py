"""Recurrent MIL ops: ``lstm``.

Semantics as coremltools' ``mil/ops/defs/iOS15/recurrent.py``: ``x`` is ``(s, b, I)``; the weights
hold the gates in the order input, forget, output, cell (``ifoz``, not PyTorch's ``ifgo``); ``bias``
is the sum of the input and recurrent biases; ``peephole`` (``3H``: input, forget, output) adds
``p · c`` to those gates (the previous cell state for input and forget, the new one for output).
``direction`` is ``forward``, ``reverse`` or ``bidirectional`` (the backward direction's weights in
``*_back``, its states in the second half of ``initial_h`` / ``initial_c``, its outputs after the
forward ones on the last axis). Outputs: the hidden states of every step (``output_sequence``) or of
the last one ``(1, b, D·H)``, then the final hidden and cell states ``(b, D·H)``.
"""

from __future__ import annotations

import torch

from anefx.targets.mil.kernels.base import Args, to_bool

_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "linear": lambda v: v,
}


def _activation(name: str | None, default: str):
    name = (name or default).lower()
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"lstm activation {name!r} (the interpreter computes {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _direction(x, h, c, w_ih, w_hh, bias, peephole, reverse: bool, acts):
    """One direction over the sequence: (outputs (s, b, H), final h, final c)."""
    rec, cell, out_act = acts
    hidden = w_hh.shape[1]
    gates_x = torch.matmul(x, w_ih.t())
    if bias is not None:
        gates_x = gates_x + bias
    p_i, p_f, p_o = peephole.split(hidden) if peephole is not None else (None, None, None)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    for t in steps:
        i, f, o, z = (gates_x[t] + torch.matmul(h, w_hh.t())).split(hidden, dim=-1)
        if p_i is not None:
            i, f = i + p_i * c, f + p_f * c
        i, f, z = rec(i), rec(f), cell(z)
        c = f * c + i * z
        if p_o is not None:
            o = o + p_o * c
        h = rec(o) * out_act(c)
        outputs[t] = h
    return torch.stack(outputs), h, c


def lstm(a: Args):
    if a.clip is not None:
        raise NotImplementedError("lstm with clip")
    acts = (
        _activation(a.recurrent_activation, "sigmoid"),
        _activation(a.cell_activation, "tanh"),
        _activation(a.activation, "tanh"),
    )
    direction = a.direction or "forward"
    x, h0, c0 = a.x, a.initial_h, a.initial_c
    if direction == "bidirectional":
        hidden = a.weight_hh.shape[1]
        h_f, h_b, c_f, c_b = h0[:, :hidden], h0[:, hidden:], c0[:, :hidden], c0[:, hidden:]
        fwd = _direction(x, h_f, c_f, a.weight_ih, a.weight_hh, a.bias, a.peephole, False, acts)
        bwd = _direction(x, h_b, c_b, a.weight_ih_back, a.weight_hh_back, a.bias_back, a.peephole_back, True, acts)
        seq = torch.cat([fwd[0], bwd[0]], dim=-1)
        h, c = torch.cat([fwd[1], bwd[1]], dim=-1), torch.cat([fwd[2], bwd[2]], dim=-1)
    else:
        seq, h, c = _direction(x, h0, c0, a.weight_ih, a.weight_hh, a.bias, a.peephole, direction == "reverse", acts)
    out = seq if to_bool(a.output_sequence) else h.unsqueeze(0)
    return out, h, c


KERNELS = {"lstm": lstm}
