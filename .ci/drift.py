"""Which newer release of the capped Hugging Face stack breaks what: an early warning, not a CI gate.

    python .ci/drift.py [--venv .venv-drift] [--pytest-args "-x tests/test_loading.py"]

Installs the project as the README does (the capped, tested set) into a fresh virtual environment, then, for each
package of the bounded stack whose newest release on the index is above pyproject.toml's cap, upgrades that package
alone (ignoring the cap), runs the test suite, records the failing tests and puts the tested version back. It ends
with one line per package: its cap, its newest release, and what broke. A package whose newest release passes can
have its cap raised; refresh the lock after that (`bash .ci/run --refresh-lock`).

torch is left out: its newer releases are multi-GB CUDA builds here, where CI tests the CPU build of the cap.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACK = ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "safetensors")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, text=True, **kwargs)


def installed_version(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return run([str(python), "-c", code], capture_output=True, check=True).stdout.strip()


def newest_release(python: Path, package: str) -> str:
    listing = run([str(python), "-m", "pip", "index", "versions", package], capture_output=True, check=True).stdout
    return re.match(r"\S+ \(([^)]+)\)", listing)[1]  # "name (newest)" on the first line


def failing_tests(python: Path, pytest_args: list[str]) -> list[str]:
    finished = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], capture_output=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", finished.stdout, re.M)  # pytest's short summary (-ra)
    if finished.returncode not in (0, 1) and not failed:
        failed = [f"pytest exited {finished.returncode}: {finished.stdout.strip().splitlines()[-1:]}"]
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-drift")
    parser.add_argument("--pytest-args", default="", help="Passed to pytest (default: the whole suite).")
    args = parser.parse_args()
    python = args.venv / "bin" / "python"
    run([sys.executable, "-m", "venv", "--clear", str(args.venv)], check=True)
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0", "-e", ".[dev]"], check=True)
    run([str(python), "tests/transformers_test_sources.py"], check=True)
    pytest_args = shlex.split(args.pytest_args)
    findings = {}
    for package in STACK:
        capped, newest = installed_version(python, package), newest_release(python, package)
        if newest == capped:
            findings[package] = {"cap": capped, "newest": newest, "broken": None}
            continue
        run([str(python), "-m", "pip", "install", "--quiet", f"{package}=={newest}"], check=True)
        run([str(python), "tests/transformers_test_sources.py"], check=True)
        findings[package] = {"cap": capped, "newest": newest, "broken": failing_tests(python, pytest_args)}
        run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0", "-e", ".[dev]"], check=True)
    print("\nDrift of the bounded stack (each package upgraded alone):")
    for package, finding in findings.items():
        if finding["broken"] is None:
            verdict = "no newer release"
        elif finding["broken"]:
            verdict = f"{len(finding['broken'])} failing: " + ", ".join(finding["broken"][:10])
        else:
            verdict = "the suite passes: the cap can be raised"
        print(f"  {package:16s} cap {finding['cap']:10s} newest {finding['newest']:10s} {verdict}")
    (ROOT / ".drift.json").write_text(json.dumps(findings, indent=2) + "\n")


if __name__ == "__main__":
    main()
