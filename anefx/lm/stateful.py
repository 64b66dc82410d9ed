"""The stateful form of a rewritten step function: the KV cache as module buffers mutated in place.

``Stateful(step, layout)`` holds one buffer per state (``key_cache_0`` …, the names the Core ML states
get) and calls the validated pure step function ``(input_ids, position_ids, *states) -> (logits,
*states')``, then copies the new states into the buffers. ``torch.export`` records the copies as
buffer mutations, which coremltools (iOS18) turns into ``read_state`` / ``coreml_update_state``.
The same module runs generation in PyTorch; :meth:`reset` zeroes the cache.
"""

from __future__ import annotations

import torch

from anefx.lm.cache import CacheLayout


class Stateful(torch.nn.Module):
    def __init__(self, step: torch.nn.Module, layout: CacheLayout, states: list[torch.Tensor] | None = None):
        super().__init__()
        self.step = step
        self.layout = layout
        self.names = layout.state_names
        for name, t in zip(self.names, states if states is not None else layout.zeros(), strict=True):
            self.register_buffer(name, t)

    def states(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.names]

    def reset(self) -> None:
        with torch.no_grad():
            for t in self.states():
                t.zero_()

    def forward(self, input_ids, position_ids):
        out = self.step(input_ids, position_ids, *self.states())
        logits, new = out[0], out[1:]
        for buf, value in zip(self.states(), new, strict=True):
            buf.copy_(value)
        return logits
