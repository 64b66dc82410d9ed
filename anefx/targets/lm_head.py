"""Large vocabularies: the LM head split into channel chunks, and argmax / top-k inside the model.

One ANE tensor dimension holds at most 16,384 elements on A13-A15 and 65,536 on A16 and later
(sbryngelson/ANEForge#240 tiles the vocabulary to the family's ``max_tensor_dim``; maderix/ANE#26
chunks Qwen2.5's 151,936-entry head because it "exceeds ANE's 65536 max dim"). A projection to the
vocabulary is a 1x1 conv whose output channels are the vocabulary and whose value is a model
output (through layout moves only), so anefx splits it into convs of
at most ``max_channels`` output channels over slices of the same weight, concatenated on the
channel axis:

    Original:  %logits = conv2d(%h, %w)                     # w: (V, C, 1, 1), V > max_channels
    Result:    %l_i = conv2d(%h, slice(%w, 0, i*M, (i+1)*M))  for each chunk i
               %logits = cat([%l_0, … %l_n], 1)

``compile`` applies it to the hand-off copy of the graph (the compiled torch graph keeps its single
conv) and checks the result in torch against the graph it came from. By default only heads above
65,536 channels (the hard limit on every chip) are split; ``LMHeadOptions()`` splits at 16,384 (every
chip) and can also make the model return ``argmax`` token ids or ``topk`` (values, ids) instead of
the logits, so the full logits never leave the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from anefx.compat.torch import set_flat_io
from anefx.ir.errors import AnefxError
from anefx.ir.graph import node_arg

_CONVS = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)


@dataclass(frozen=True)
class LMHeadOptions:
    """max_channels: output channels per conv (16,384 fits every ANE; 65,536 fits A16 and later).
    output: ``"logits"`` (default), ``"argmax"`` (int token ids) or ``"topk"`` (``k`` values and ids).
    """

    max_channels: int = 16384
    output: str = "logits"
    k: int = 1


#: What ``compile`` applies without options: only what no ANE can hold in one conv.
HARD_LIMIT = LMHeadOptions(max_channels=65536)


def check(options: LMHeadOptions) -> LMHeadOptions:
    if options.output not in ("logits", "argmax", "topk"):
        raise AnefxError(f"LMHeadOptions.output is 'logits', 'argmax' or 'topk', got {options.output!r}")
    if options.max_channels < 1 or options.k < 1:
        raise AnefxError(f"LMHeadOptions needs max_channels >= 1 and k >= 1, got {options}")
    return options


def split_head(gm: torch.fx.GraphModule, options: LMHeadOptions) -> tuple[torch.fx.GraphModule, dict]:
    """Rewrite ``gm`` in place (give it a copy): convs over ``max_channels`` output channels become
    channel chunks; the first output becomes argmax / top-k when asked. Returns (gm, stats)."""
    graph = gm.graph
    split = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CONVS:
            continue
        weight = node.args[1]
        out_channels = weight.meta["val"].shape[0] if "val" in weight.meta else 0
        groups = node.args[6] if node.target is torch.ops.aten.convolution.default else node_arg(node, 6, "groups", 1)
        if out_channels <= options.max_channels or groups != 1 or not _feeds_output(node):
            continue
        n = math.ceil(out_channels / options.max_channels)
        bias = node.args[2] if len(node.args) > 2 else None
        parts = []
        with graph.inserting_before(node):
            for i in range(n):
                lo, hi = i * options.max_channels, min((i + 1) * options.max_channels, out_channels)
                w = graph.call_function(torch.ops.aten.slice.Tensor, (weight, 0, lo, hi))
                b = graph.call_function(torch.ops.aten.slice.Tensor, (bias, 0, lo, hi)) if bias is not None else None
                args = list(node.args)
                args[1], args[2:3] = w, ([b] if len(node.args) > 2 else [])
                parts.append(graph.call_function(node.target, tuple(args), dict(node.kwargs)))
            cat = graph.call_function(torch.ops.aten.cat.default, (parts, 1))
        node.replace_all_uses_with(cat)
        graph.erase_node(node)
        split += 1
    if options.output != "logits":
        out = next(n for n in graph.nodes if n.op == "output")
        leaves = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        logits = leaves[0]
        with graph.inserting_before(out):
            if options.output == "argmax":
                leaves[0] = graph.call_function(torch.ops.aten.argmax.default, (logits, -1))
            else:
                top = graph.call_function(torch.ops.aten.topk.default, (logits, options.k, -1))
                leaves[0:1] = [graph.call_function(_getitem, (top, 0)), graph.call_function(_getitem, (top, 1))]
        set_flat_io(graph)  # the output structure changed: plain tuple
        out.args = (tuple(leaves),)
    graph.lint()
    gm.recompile()
    return gm, {"lm_head_split": split, "output": options.output}


_MOVES = ("view", "reshape", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "clone", "_to_copy")


def _feeds_output(node: torch.fx.Node) -> bool:
    """A projection to the vocabulary: its value reaches a graph output through layout moves only."""
    for _ in range(16):
        if any(u.op == "output" for u in node.users):
            return True
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
        if node.op != "call_function" or not any(m in str(node.target) for m in _MOVES):
            return False
    return False


def _getitem(x, i):
    return x[i]


def output_names(names: list[str], options: LMHeadOptions) -> list[str]:
    if options.output == "argmax":
        return ["token", *names[1:]]
    if options.output == "topk":
        return ["topk_values", "topk_ids", *names[1:]]
    return list(names)


def verify(original: list[torch.Tensor], rewritten: list[torch.Tensor], options: LMHeadOptions) -> None:
    """The rewritten head computes what the graph computed (logits equal up to fp32 rounding; token
    ids equal the argmax / top-k of the original logits)."""
    logits = original[0]
    if options.output == "logits":
        want, got = original, rewritten
    elif options.output == "argmax":
        want, got = [logits.argmax(-1), *original[1:]], rewritten
    else:
        top = torch.topk(logits, options.k, -1)
        want, got = [top.values, top.indices, *original[1:]], rewritten
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.dtype.is_floating_point:
            ok = torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(float(b.abs().max()), 1.0))
        else:
            ok = torch.equal(a, b)
        if not ok:
            raise AnefxError(f"the split LM head changed output {i}: it is not shipped (report this model)")


def split_handoff(handoff, flat_inputs, lm_head: LMHeadOptions | None):
    """The hand-off with a copy of its graph whose vocabulary projection is split (and argmax/top-k
    added), checked in torch against the graph it came from; ``(handoff, stats)``, or the hand-off
    unchanged and None when there is nothing to do (``lm_head`` None: only heads above the hard limit)."""
    import dataclasses

    from anefx.driver.validate import run_flat
    from anefx.ir.graph import clone_graph_module

    options = check(lm_head) if lm_head is not None else HARD_LIMIT
    gm, stats = split_head(clone_graph_module(handoff.graph_module), options)
    if not stats["lm_head_split"] and options.output == "logits":
        return handoff, None
    flat = list(flat_inputs)
    verify(run_flat(handoff.graph_module, flat), run_flat(gm, flat), options)
    if options.output == "logits":  # same outputs: validated against the model as the passes were
        return dataclasses.replace(handoff, graph_module=gm, checks={}), stats
    # token ids instead of logits: the graph takes and returns flat values now, and what the target
    # does to it is validated against this graph (checked above against the logits' argmax / top-k)
    validator = None
    if handoff.validator is not None:
        from anefx.driver.validate import Validator

        validator = Validator(gm, flat, handoff.validator.options)
    names = output_names(handoff.output_names, options)
    split = dataclasses.replace(
        handoff, graph_module=gm, example_args=tuple(flat), example_kwargs={}, output_names=names, validator=validator
    )
    split.checks = {}
    return split, stats
