"""What a staged zero-shot repository needs to serve on Inference Endpoints: `handler.py` at its root and a
`requirements.txt` naming what the repository's code imports, at the versions it was staged with."""

import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

from transformers.dynamic_module_utils import get_imports

from ..models.ace_lora import handler


HANDLER_NAME = "handler.py"
REQUIREMENTS_NAME = "requirements.txt"
# Imported only where they are needed, inside guards that transformers' import scan skips: the DICOM reader.
GUARDED_IMPORTS = ("pydicom",)
# The repository's hf_model_inference.py imports this package (not on PyPI); the endpoint does not run that script.
PACKAGE = __name__.split(".")[0]


def requirements(folder: Path) -> str:
    """One `distribution==version` line for each package the Python files of `folder` import (and the guarded ones),
    pinned to the versions installed here, with which the repository was saved and its code tested."""
    imported = {name for file in folder.glob("*.py") for name in get_imports(str(file))}
    third_party = (imported | set(GUARDED_IMPORTS)) - set(sys.stdlib_module_names) - {PACKAGE}
    distributions = packages_distributions()
    names = sorted({distributions.get(name, [name])[0] for name in third_party}, key=str.lower)
    # A local build label (torch's `+cpu`) names no release on PyPI.
    return "".join(f"{name}=={version(name).split('+')[0]}\n" for name in names)


def add_endpoint_files(folder: Path) -> None:
    """Copy the handler into the staged repository `folder` (which holds its code) and write its requirements."""
    (folder / HANDLER_NAME).write_text(Path(handler.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    (folder / REQUIREMENTS_NAME).write_text(requirements(folder), encoding="utf-8")


__all__ = ["HANDLER_NAME", "REQUIREMENTS_NAME", "add_endpoint_files", "requirements"]
