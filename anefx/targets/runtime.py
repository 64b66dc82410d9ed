"""``anefx.load(path)``: a saved program, ready to run, whichever executor runs it here.

| what                         | ``runtime="auto"`` (the default)  | other choices                     |
|------------------------------|-----------------------------------|-----------------------------------|
| ``.mlpackage`` (ML Program)  | ``"mil"``: anefx's interpreter    | ``"coreml"``: Core ML, macOS only |
| ``.aimodel``                 | ``"coreai"``: coreai-core runtime |                                   |

The interpreter is the default everywhere, macOS included, so that results do not depend on the
machine; ``runtime="coreml"`` runs the same package with Apple's Core ML to compare the two.
Every executor gives the interface of :class:`anefx.targets.executor.LoadedProgram`.

A chunk folder (``manifest.json``, format ``anefx-chunks/2``, and one package per chunk, as
``compile`` and ``compile_lm`` both write it) loads as a :class:`~anefx.targets.executor.ChainProgram`:
one more ``LoadedProgram``, whose call runs the chunks in order, each chunk's outputs feeding the
next one's inputs and each chunk keeping its own states. What a compile built (a ``CompiledModel``,
a ``CompiledLM`` or their ``Artifact``) loads the same way, without saving it first.
"""

from __future__ import annotations

from pathlib import Path

from anefx.ir.errors import AnefxError
from anefx.targets.artifact import Artifact
from anefx.targets.executor import LoadedProgram

RUNTIMES = ("auto", "mil", "coreml", "coreai")


def load(path, runtime: str = "auto") -> LoadedProgram:
    """The program saved at ``path`` (an ``.mlpackage``, an ``.aimodel`` or a chunk folder), ready to run.

    ``path`` may also be a coremltools ``MLModel`` (an ML Program, e.g. what ``ct.convert``
    returned): the interpreter runs the package behind it, the bytes its ``save`` writes; or what a
    compile returned (or its ``artifact``): its target's executor runs what ``save`` would write."""
    if runtime not in RUNTIMES:
        raise AnefxError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    artifact = getattr(path, "artifact", path)
    if isinstance(artifact, Artifact):
        return artifact.executor(runtime)
    if hasattr(path, "get_spec") and runtime in ("auto", "mil"):
        from anefx.targets.mil import MILProgram

        return MILProgram.from_mlmodel(path)
    path = Path(path)
    if not path.exists():
        raise AnefxError(f"cannot load {path}: no such file or folder")
    if (path / "manifest.json").is_file():
        program = Artifact.load(path).executor(runtime)
        program.source = str(path)
        return program
    if path.suffix == ".aimodel" or ((path / "metadata.json").is_file() and not (path / "Manifest.json").exists()):
        if runtime not in ("auto", "coreai"):
            raise AnefxError(f"{path} is a Core AI model: it runs with runtime='coreai', not {runtime!r}")
        from anefx.targets.coreai import CoreAIProgram

        return CoreAIProgram(path)
    if runtime == "coreai":
        raise AnefxError(f"{path} is not an .aimodel: runtime='coreai' runs Core AI models")
    if runtime == "coreml":
        from anefx.targets.coreml import CoreMLProgram

        return CoreMLProgram(path)
    from anefx.targets.mil import MILProgram

    return MILProgram.open(path)
