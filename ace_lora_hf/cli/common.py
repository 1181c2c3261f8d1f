"""The one exit path of every command line: a user-caused error is one line on stderr, a bug keeps its traceback."""

import errno
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ..errors import AceLoraError
from ..outputs.launched_processes import error_text, later_process_of_machine
from ..outputs.terminal import printable


EXIT_OK = 0
EXIT_USER_ERROR = 2  # as argparse's usage errors
EXIT_INPUTS_SKIPPED = 3  # the job finished, but some inputs could not be used (they are listed)
EXIT_INTERRUPTED = 130
# Operating-system errors that say something about the user's machine or paths, not about this package.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                      errno.EPERM: "operation not permitted", errno.ENAMETOOLONG: "file name too long"}


def error_line(program: str, message: object) -> str:
    """`program: error: message` on one line, control characters of the names it quotes shown as escapes."""
    return f"{program}: error: {printable(' '.join(str(message).split()))}"


# torch re-raises an error of a DataLoader worker as a new exception whose message holds the worker's traceback as
# text, ending in the original `module.Class: message` line.
WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback .*\n[\w.]*\b\1: (.*)$",
                          re.DOTALL)


def _subclass_names(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_subclass_names(subclass) for subclass in cls.__subclasses__()))


def user_error_from_worker(error: BaseException) -> str | None:
    """The message of a user error (an `AceLoraError`) raised in a DataLoader worker process, else None."""
    found = WORKER_ERROR.match(str(error))
    if found is None or found.group(1) not in _subclass_names(AceLoraError):
        return None
    return found.group(2)


def fail(program: str, error: BaseException, message: object) -> NoReturn:
    """Exit 2 after printing `message` as the error line (under a launcher of several processes, as
    `ace_lora_hf.outputs.launched_processes` says which process prints it)."""
    print(error_line(program, error_text(error, str(message))), file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit: its return value (0 when None), 2 with one line for an `AceLoraError` (raised here
    or in a DataLoader worker) or an environment error (disk full, permissions), 130 on Ctrl-C. Any other exception
    propagates with its traceback."""
    program = Path(sys.argv[0]).name or "ace-lora"
    try:
        code = main(argv)
    except AceLoraError as error:
        fail(program, error, user_error_from_worker(error) or error)
    except RuntimeError as error:  # torch's wrapper of a worker's error that it could not rebuild
        message = user_error_from_worker(error)
        if message is None:
            raise
        fail(program, error, message)
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" while writing {error.filename}" if error.filename else ""
        fail(program, error, f"{ENVIRONMENT_ERRNOS[error.errno]}{where}; free space, fix the permissions or choose "
                             "another output location")
    except KeyboardInterrupt:
        if not later_process_of_machine():  # Ctrl-C reaches every process: the first says so
            print(error_line(program, "interrupted"), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or EXIT_OK)


__all__ = ["EXIT_INPUTS_SKIPPED", "EXIT_OK", "EXIT_USER_ERROR", "error_line", "run_cli"]
