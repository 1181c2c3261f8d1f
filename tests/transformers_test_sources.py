"""transformers' common model and configuration tests, taken from the source distribution of the installed version.

transformers' wheel ships no tests. Its sdist on the package index has `tests/test_modeling_common.py` and
`tests/test_configuration_common.py`, but not the other test modules they import. `common_test_sources()` downloads
the sdist once (`pip download`), unpacks those two files into a cache folder as the package `transformers_tests`,
and writes a stub for each missing import:

- `utils/test_configuration_utils.py`: `config_common_kwargs`, a non-default value for every public field of
  `PreTrainedConfig` (upstream keeps its list in a test module the sdist lacks; `test_transformers_common.py` checks
  that this one still covers every field of the installed version).
- `exporters/test_export.py`: an empty `ExportTesterMixin`, so upstream's exporter tests (`transformers.exporters`
  to torch.export, ONNX and ExecuTorch) do not run; `test_modeling_conventions.py` and `test_export_onnx.py` test
  our export paths.
- `generation/test_utils.py`: an empty `GenerationTesterMixin`; the common tests only use it in `issubclass`
  checks, and ACE-LoRA does not generate.

The cache is `$ACE_LORA_TRANSFORMERS_TESTS_CACHE` (default `~/.cache/ace-lora-hf/transformers-sdist`), one folder
per transformers version. Run this file to fill it ahead of the tests (CI does so before running pytest).
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


CACHE_VARIABLE = "ACE_LORA_TRANSFORMERS_TESTS_CACHE"
PACKAGE = "transformers_tests"
COMMON_TEST_FILES = ("test_modeling_common.py", "test_configuration_common.py")
STUBS = {
    "__init__.py": '"""Part of transformers\' tests/, unpacked by ace-lora-hf\'s transformers_test_sources.py."""\n',
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": '''"""Stub: a non-default value for each public field of PreTrainedConfig."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
    "exporters/__init__.py": "",
    "exporters/test_export.py": '''"""Stub: upstream's exporter tests are not in the sdist and do not run here."""


class ExportTesterMixin:
    pass
''',
    "generation/__init__.py": "",
    "generation/test_utils.py": '''"""Stub: the common tests only use GenerationTesterMixin in issubclass checks."""


class GenerationTesterMixin:
    pass
''',
}


class SourcesUnavailable(RuntimeError):
    """The sdist could not be downloaded (no network, no such version on the index)."""


def installed_version() -> str:
    return importlib.metadata.version("transformers")


def cache_root() -> Path:
    default = Path.home() / ".cache" / "ace-lora-hf" / "transformers-sdist"
    return Path(os.environ.get(CACHE_VARIABLE, default))


def common_test_sources(version: str | None = None) -> Path:
    """The folder holding the `transformers_tests` package for `version` (default: installed); fetched once."""
    version = version or installed_version()
    folder = cache_root() / version
    if not all((folder / PACKAGE / name).is_file() for name in COMMON_TEST_FILES):
        folder.mkdir(parents=True, exist_ok=True)
        _unpack(_sdist(version, folder), version, folder / PACKAGE)
    return folder


def _sdist(version: str, folder: Path) -> Path:
    tarball = folder / f"transformers-{version}.tar.gz"
    if tarball.is_file():
        return tarball
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
               "--no-deps", "--quiet", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not tarball.is_file():
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SourcesUnavailable(f"`{' '.join(command[2:])}` failed: {last_line}")
    return tarball


def _unpack(tarball: Path, version: str, package: Path) -> None:
    """Extract the common test files and write the stubs under a temporary name, then rename into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{PACKAGE}.", dir=package.parent))
    try:
        with tarfile.open(tarball) as archive:
            for name in COMMON_TEST_FILES:
                member = archive.extractfile(f"transformers-{version}/tests/{name}")
                (staging / name).write_bytes(member.read())
        for name, text in STUBS.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        staging.rename(package)
    except OSError:
        if not package.is_dir():  # another process may have unpacked the same version meanwhile
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    print(common_test_sources())
