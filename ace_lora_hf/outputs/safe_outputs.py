"""Writing outputs without losing what a user has: checked paths, atomic files and folders, folder locks.

- An output never replaces one of the job's inputs, even with `--overwrite`.
- Files and folders are written under a temporary name in the same folder and renamed when complete, so an
  interrupted job leaves either the old output or the new one, never half of one.
- A folder that another running job writes to is refused (a lock file beside it).
"""

import errno
import fcntl
import glob
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from ..errors import FolderInUseError, OutputPathError


def _same_path(path: Path, other: Path) -> bool:
    if path.exists() and other.exists():
        return os.path.samefile(path, other)
    return path.resolve() == other.resolve()


def check_output_file(
    path: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False, option: str = "--output"
) -> Path:
    """Validate an output file before any work: not a folder, not an input, not existing unless `overwrite`.

    Creates the parent folder if needed, so that a missing folder is found now rather than after the work.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name inside it.")
    for source in inputs:
        if _same_path(path, Path(source)):
            raise OutputPathError(f"{option} {path} is also an input of this job; choose another file name "
                                  "(--overwrite never replaces an input).")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{option} {path} exists; pass --overwrite to replace it, or choose another name.")
    ensure_folder(path.parent, option)
    return path


def ensure_folder(folder: str | Path, option: str = "--output") -> Path:
    """`folder`, created if missing; an existing file of that name is refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option}: {folder} is a file, not a folder; choose a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_output_folder(
    folder: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False, option: str = "--output"
) -> Path:
    """Validate a folder that a job will write as a whole: not a file, not an input, empty unless `overwrite`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option} {folder} is a file, not a folder; choose a folder.")
    for source in inputs:
        source = Path(source)
        if _same_path(folder, source) or (source.exists() and folder.resolve() in source.resolve().parents):
            raise OutputPathError(f"{option} {folder} holds an input of this job ({source}); choose another folder "
                                  "(--overwrite never replaces an input).")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputPathError(f"{option} {folder} is not empty; pass --overwrite to replace it, or choose another "
                              "folder.")
    ensure_folder(folder.parent, option)
    return folder


def _temporary_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.{kind}")


@contextmanager
def naming_output(path: str | Path) -> Iterator[None]:
    """Errors of the operating system inside the block name `path` where they name no file: a full disk is reported
    by a flush or by safetensors' writer without one, and the user must learn which output could not be written."""
    try:
        yield
    except SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from error
    except OSError as error:
        if error.filename is not None or error.errno not in errno.errorcode:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file beside `path` for writing; it replaces `path` only when the block completes.

    The temporary name is random and created exclusively: a file or link planted beside `path` is never written
    through."""
    path = Path(path)
    staging = _temporary_sibling(path, "tmp")
    try:
        with naming_output(path), open(staging, mode.replace("w", "x"), **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path, encoding="utf-8") as file:
        file.write(text)
    return Path(path)


def json_safe(value):
    """`value` with every NaN or infinite float replaced by None, so that it serialises as valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json_atomic(path: str | Path, value) -> Path:
    """`value` as indented, valid JSON (NaN and infinities written as null), atomically."""
    return write_text_atomic(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")


@contextmanager
def atomic_folder(target: str | Path, others: str = "replace", option: str = "--output") -> Iterator[Path]:
    """Yield a temporary folder beside `target` that replaces `target` only when the block completes.

    An earlier `target` is moved aside first and deleted only after the new one is in place. A failed block
    leaves `target` as it was and removes the temporary folder. Temporary folders of `target` that a killed process
    left behind (SIGTERM, power loss) are removed first: the caller holds `target`'s lock (`folder_lock`), so no
    other process is writing them.

    `others` says what becomes of files in an earlier `target` that the block did not write: "replace" (they go: a
    model folder must not keep stale weight shards), "keep" (they move into the new folder: a user's notes beside
    exported files), or "refuse" (an `OutputPathError` naming one of them, `target` left as it was: a folder that is
    uploaded as a whole must not take a user's files along, nor lose them).
    """
    target = Path(target)
    _remove_leftovers(target)
    staging = _temporary_sibling(target, "staging")
    staging.mkdir(parents=True)
    try:
        with naming_output(target):
            yield staging
        _give_files_default_permissions(staging)
        _settle_other_files(target, staging, others, option)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _settle_other_files(target: Path, staging: Path, others: str, option: str) -> None:
    if others == "replace" or not target.is_dir():
        return
    foreign = sorted(entry for entry in target.iterdir() if not (staging / entry.name).exists())
    if foreign and others == "refuse":
        raise OutputPathError(f"{option} {target} holds {foreign[0].name!r}"
                              f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which this command "
                              "does not write there; move it out, or choose another folder (--overwrite replaces only "
                              "what the command wrote).")
    for entry in foreign:
        entry.rename(staging / entry.name)


def _remove_leftovers(target: Path) -> None:
    for kind in ("staging", "old"):
        for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.{kind}"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)


def _give_files_default_permissions(folder: Path) -> None:
    """Files as a plain `open` would create them (0666 less the umask): transformers writes `model.safetensors`
    through a private temporary file (0600), which would keep a shared model folder from its other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`, replacing a folder already there (moved aside first, deleted last)."""
    retired = _temporary_sibling(target, "old") if target.exists() else None
    if retired is not None:
        target.rename(retired)
    source.rename(target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def folder_lock(folder: str | Path, option: str = "--output") -> Iterator[Path]:
    """Hold `folder` for this job: a second job asking for the same folder is refused at once.

    The lock is a file beside the folder (`.NAME.lock`), so that replacing the folder does not drop the lock, taken
    with `flock` (POSIX) and removed when the job ends. It is keyed by the resolved path: the same folder named
    through a link, or as `a/../b`, is the same folder.
    """
    folder = Path(folder)
    ensure_folder(folder.parent, option)
    resolved = folder.resolve()
    lock = resolved.parent / f".{resolved.name}.lock"
    descriptor = _take_lock(lock)
    if descriptor is None:
        raise FolderInUseError(f"{option} {folder} is in use by another running job; wait for it to finish or "
                               "choose another folder.")
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)  # while still held: a job that opened the file before finds it gone, not free
        os.close(descriptor)


def _take_lock(lock: Path) -> int | None:
    """A descriptor of `lock` locked with `flock`, without waiting; None where another job holds it. A lock file that
    a finishing job removed between our open and our lock would guard nothing: it is opened afresh."""
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(descriptor).st_ino == os.stat(lock, follow_symlinks=False).st_ino:
                return descriptor
        except BlockingIOError:
            os.close(descriptor)
            return None
        except FileNotFoundError:
            pass
        os.close(descriptor)


__all__ = ["atomic_file", "atomic_folder", "check_output_file", "check_output_folder", "ensure_folder",
           "folder_lock", "json_safe", "naming_output", "replace_folder",
           "write_json_atomic", "write_text_atomic"]
