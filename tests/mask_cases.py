"""Stress masks for attention tests: the masks a compile never saw.

``keep_masks(b, s, seed)`` yields ``(name, mask)`` pairs of (B, S) boolean keep-masks (True = attend):
padding on the right and on the left, random holes, and rows that keep one key only. Every row keeps
at least one key (fully masked rows are tested on their own, see ``anefx.analysis.masks``).
"""

from __future__ import annotations

import torch


def keep_masks(b: int, s: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(s)
    n = torch.randint(1, s + 1, (b,), generator=gen)
    yield "right_padding", idx[None, :] < n[:, None]
    yield "left_padding", idx[None, :] >= (s - n)[:, None]
    holes = torch.rand(b, s, generator=gen) < 0.5
    holes[torch.arange(b), torch.randint(0, s, (b,), generator=gen)] = True
    yield "holes", holes
    one = torch.zeros(b, s, dtype=torch.bool)
    one[torch.arange(b), torch.randint(0, s, (b,), generator=gen)] = True
    yield "all_masked_but_one", one


def keep_masks_4d(b: int, sq: int, sk: int, seed: int = 0):
    """(B, 1, S_q, S_k) keep-masks with a different random pattern per query row (each keeps a key),
    some rows keeping exactly one key."""
    gen = torch.Generator().manual_seed(seed)
    for name in ("rows", "one_per_row"):
        if name == "rows":
            m = torch.rand(b, 1, sq, sk, generator=gen) < 0.5
        else:
            m = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
        pick = torch.randint(0, sk, (b, 1, sq), generator=gen)
        m.scatter_(3, pick[..., None], True)
        yield name, m
