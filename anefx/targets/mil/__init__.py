"""anefx's MIL interpreter: run any saved Core ML ML Program on any OS, fp16 computed as fp16.

``MILProgram.open("model.mlpackage")`` reads the package back (coremltools' ``milproto`` loader,
:mod:`~anefx.targets.mil.reader`), prepares each function (:mod:`~anefx.targets.mil.interpreter`)
and runs it with one torch kernel per MIL op (:mod:`~anefx.targets.mil.kernels`). It is one
executor behind ``anefx.load`` (:mod:`anefx.targets.runtime`).
"""

from anefx.targets.mil.interpreter import SUPPORTED_OPS, ExecutionError, UnsupportedOpError
from anefx.targets.mil.program import MILOp, MILProgram, MILState

__all__ = ["SUPPORTED_OPS", "ExecutionError", "MILOp", "MILProgram", "MILState", "UnsupportedOpError"]
