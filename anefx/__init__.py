"""anefx: compile PyTorch models for the Apple Neural Engine by graph rewriting.

compiled = anefx.compile(model, (x,))
compiled.save("model.mlpackage")
print(compiled.report)
program = anefx.load("model.mlpackage")      # run what ships (any ML Program, or an .aimodel)
outputs = program({"x": x})
"""

from anefx.ane.report import ANEReport
from anefx.backend import backend
from anefx.check import check, check_artifact
from anefx.compile import CompiledModel, compile  # noqa: A004
from anefx.core.options import CompileOptions
from anefx.driver.debug import DebugOptions
from anefx.driver.events import Event
from anefx.driver.pipeline import Pipeline
from anefx.driver.report import PassRecord, Report
from anefx.driver.reproducer import load_reproducer
from anefx.driver.validate import Tolerance, ValidationOptions
from anefx.ir.capture import Captured, capture
from anefx.ir.errors import AnefxError, CaptureError, ConversionError, PassError, TargetUnavailableError
from anefx.lm import CompiledLM, compile_lm
from anefx.passes import Pass, PassContext, PassResult
from anefx.targets.runtime import load

__version__ = "0.1.0"

__all__ = [
    "ANEReport",
    "AnefxError",
    "CaptureError",
    "Captured",
    "CompileOptions",
    "CompiledLM",
    "CompiledModel",
    "ConversionError",
    "DebugOptions",
    "Event",
    "Pass",
    "PassContext",
    "PassError",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "Report",
    "TargetUnavailableError",
    "Tolerance",
    "ValidationOptions",
    "backend",
    "capture",
    "check",
    "check_artifact",
    "compile",
    "compile_lm",
    "load",
    "load_reproducer",
]
