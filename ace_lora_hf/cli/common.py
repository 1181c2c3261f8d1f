"""The one exit path of every command line: a user-caused error is one line on stderr, a bug keeps its traceback."""

import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ..errors import AceLoraError
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


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit: its return value (0 when None), 2 with one line for an `AceLoraError` or an
    environment error (disk full, permissions), 130 on Ctrl-C. Any other exception propagates with its traceback."""
    program = Path(sys.argv[0]).name or "ace-lora"
    try:
        code = main(argv)
    except AceLoraError as error:
        print(error_line(program, error), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" while writing {error.filename}" if error.filename else ""
        print(error_line(program, f"{ENVIRONMENT_ERRNOS[error.errno]}{where}; free space, fix the permissions or "
                                  "choose another output location"), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(error_line(program, "interrupted"), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or EXIT_OK)


__all__ = ["EXIT_INPUTS_SKIPPED", "EXIT_OK", "EXIT_USER_ERROR", "error_line", "run_cli"]
