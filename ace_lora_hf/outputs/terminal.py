"""What a command prints: text from the user's files (image names, labels, table cells) as it is safe to print, with
control characters shown as escapes, so that a file named with a terminal escape sequence cannot clear the screen,
move the cursor or forge rows; and, under a launcher that starts several processes, which of them prints an error."""

import os
import unicodedata


# Cc: C0 and C1 controls (escape, carriage return, ...); Cf: bidirectional overrides and other invisible formats;
# Zl, Zp: the Unicode line and paragraph separators, which end a line in some terminals and viewers.
CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


# Set on an error that one process met on its own data (its shard of a training set); others are met alike by all.
RAISED_BY_ONE_PROCESS = "raised_by_one_process"


def printable(text: str) -> str:
    """`text` with every control or invisible formatting character replaced by its Python escape (`\\x1b`)."""
    return "".join(character.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(character) in CONTROL_CATEGORIES else character for character in text)


def launched_processes() -> int:
    """How many processes a launcher (`accelerate launch`, torchrun) started for this job; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def repeated_by_another_process() -> bool:
    """True in the second and later processes of a machine under a launcher. They parse the same arguments and
    check the same files and model as the first, so an error of those checks is printed once, by the first."""
    return launched_processes() > 1 and os.environ.get("LOCAL_RANK", "0") != "0"


def mark_raised_by_one_process(error: BaseException) -> BaseException:
    """Mark an error of this process's own work (a batch of its shard): every process that meets one prints it."""
    setattr(error, RAISED_BY_ONE_PROCESS, True)
    return error


def error_shown_here(error: BaseException, message: str) -> str | None:
    """The error line this process prints for `error`: `message`, prefixed by the process's rank when it is one
    process's own; None where another process prints the same line."""
    if launched_processes() == 1:
        return message
    if getattr(error, RAISED_BY_ONE_PROCESS, False):
        return f"process {os.environ.get('RANK', '?')}: {message}"
    return None if repeated_by_another_process() else message


__all__ = ["error_shown_here", "launched_processes", "mark_raised_by_one_process", "printable",
           "repeated_by_another_process"]
