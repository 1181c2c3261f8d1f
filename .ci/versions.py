"""The dependency versions CI tests: the lowest ones pyproject.toml allows, and the exact set a green run passed on.

    python .ci/versions.py minima            # constraints pinning every direct dependency to its lower bound
    python .ci/versions.py freeze            # the installed set, as a constraints file (what `--refresh-lock` keeps)
    python .ci/versions.py compare LOCK      # how the installed set differs from LOCK (information, not a gate)
"""

import argparse
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOT_LOCKED = {"ace-lora-hf", "pip", "setuptools", "wheel"}  # the project itself and the installers


def direct_dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def lower_bound(requirement: Requirement) -> str:
    bounds = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    if len(bounds) != 1:
        sys.exit(f"pyproject.toml: {requirement} needs exactly one lower bound (>=, == or ~=) to be tested at it")
    return bounds[0]


def minima() -> list[str]:
    return [f"{canonicalize_name(requirement.name)}=={lower_bound(requirement)}"
            for requirement in direct_dependencies()]


def installed() -> dict[str, str]:
    """Every installed distribution but this project, with local labels dropped (torch's `+cpu`): the lock must
    also install on machines that take another build of the same release."""
    versions = {}
    for distribution in importlib.metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        if name not in NOT_LOCKED:
            versions[name] = distribution.version.split("+")[0]
    return dict(sorted(versions.items()))


def read_lock(path: Path) -> dict[str, str]:
    pins = (re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip()) for line in path.read_text().splitlines())
    return {canonicalize_name(match[1]): match[2] for match in pins if match}


def compare(lock: Path) -> list[str]:
    locked, now = read_lock(lock), installed()
    changed = [f"{name}: {locked[name]} in the lock, {version} installed"
               for name, version in now.items() if name in locked and locked[name] != version]
    added = [f"{name}: {version} installed, not in the lock" for name, version in now.items() if name not in locked]
    return changed + added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("minima")
    commands.add_parser("freeze")
    commands.add_parser("compare").add_argument("lock", type=Path)
    args = parser.parse_args()
    if args.command == "minima":
        print("\n".join(minima()))
    elif args.command == "freeze":
        print("# The exact versions `bash .ci/run` last passed on (made by `bash .ci/run --refresh-lock`).")
        print("\n".join(f"{name}=={version}" for name, version in installed().items()))
    else:
        differences = compare(args.lock)
        print(f"The resolved set differs from {args.lock.name} in {len(differences)} package(s):" if differences
              else f"The resolved set is {args.lock.name}.")
        print("".join(f"  {line}\n" for line in differences), end="")


if __name__ == "__main__":
    main()
