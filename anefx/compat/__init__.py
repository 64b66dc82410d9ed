"""Compatibility seams: every private API of a dependency that anefx relies on, one module per dependency.

anefx uses a few underscore APIs of torch, coremltools and coreai (a GraphModule's input spec, a
converted model's MIL program, coremltools' k-means, …). Each is reached through exactly one function
here, and ``tests/test_compat.py`` pins the behaviour anefx relies on, so that an upgrade that
changes one of them fails in one named place instead of deep inside a pass or a target.

This is the lowest layer: it imports nothing from the rest of anefx.
"""
