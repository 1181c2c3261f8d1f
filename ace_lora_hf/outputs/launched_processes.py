"""Which process prints an error when a launcher (`accelerate launch`, torchrun) runs a command as several processes.

Every process parses the same arguments and, on one machine, checks the same files and loads the same model, so an
error of those checks would otherwise be printed once per process. Code marks such checks with
`checks_alike_in_every_process()`: an error raised there is left to the first process of each machine. A later
process waits `FIRST_PROCESS_GRACE_S` seconds for the launcher to stop it (the launcher stops every process once the
first exits); if it is still running then, the first did not meet the error after all, and it prints the error
itself. An error of a process's own work (its shard of the data, `work_of_this_process()`) or of unmarked code is
printed by every process that meets it, after `process N:`.
"""

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


FIRST_PROCESS_GRACE_S = 10.0
# On an error: True where every process meets it alike, False where it is this process's own; unset: unknown.
MET_ALIKE = "met_alike_by_every_process"


def _environment_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def launched_processes() -> int:
    """How many processes a launcher started for this job; 1 without one."""
    return max(1, _environment_int("WORLD_SIZE", 1))


def later_process_of_machine() -> bool:
    """True in the second and later processes of a machine under a launcher."""
    return launched_processes() > 1 and _environment_int("LOCAL_RANK", 0) != 0


@contextmanager
def _marked(alike: bool) -> Iterator[None]:
    try:
        yield
    except BaseException as error:
        if not hasattr(error, MET_ALIKE):  # the innermost mark stands
            setattr(error, MET_ALIKE, alike)
        raise


def checks_alike_in_every_process():
    """Checks every process makes alike (arguments; on one machine, files and the model): their errors are printed
    once per machine, by its first process."""
    return _marked(True)


def work_of_this_process():
    """Work on this process's own shard: its errors are printed by every process that meets them."""
    return _marked(False)


def wait_for_the_first_process() -> None:
    """In a later process of a machine, give the first time to print an error they all meet and exit, after which
    the launcher stops this one; returns if it was not stopped."""
    time.sleep(FIRST_PROCESS_GRACE_S)


def before_a_usage_error() -> None:
    """Every process parses the same arguments: a later process of a machine waits for the first to print a usage
    error (`wait_for_the_first_process`) before printing it itself."""
    if later_process_of_machine():
        wait_for_the_first_process()


def error_text(error: BaseException, message: str) -> str:
    """What this process prints for `error`: `message`, after `process N:` under a launcher of several processes,
    except from the first process of a machine for an error met alike. A later process waits for the first to
    print such an error first (`wait_for_the_first_process`)."""
    if launched_processes() == 1:
        return message
    if getattr(error, MET_ALIKE, False):
        if not later_process_of_machine():
            return message
        wait_for_the_first_process()
    return f"process {_environment_int('RANK', 0)}: {message}"


__all__ = ["FIRST_PROCESS_GRACE_S", "MET_ALIKE", "before_a_usage_error", "checks_alike_in_every_process", "error_text",
           "launched_processes", "later_process_of_machine", "wait_for_the_first_process", "work_of_this_process"]
