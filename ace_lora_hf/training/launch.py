"""`accelerate launch` that ends as the training script does, so that a user error is one line and exit status 2 as
in a plain run:

    python -m ace_lora_hf.training.launch [accelerate launch options] examples/pretrain.py [script options]

`accelerate launch` runs the script in child processes and turns any failure of theirs into its own: with one process
a `CalledProcessError` traceback (the child's stderr tail, which already holds the script's error line, attached) and
exit status 1; with several, torchrun's `ChildFailedError` report and exit status 1 (`--quiet`: exit status 1 alone).
The script's exit status cannot reach the shell from the child, so this launcher runs Accelerate's `launch_command`
in its own process and exits with the status of the script that failed; what the script printed (its one error line,
or a bug's traceback) has already been shown.
"""

import subprocess
import sys
from collections.abc import Sequence
from typing import NoReturn

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def exit_status(code: int) -> int:
    """A child's return code as a shell shows it (a signal's as 128 + the signal)."""
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run `accelerate launch argv` and exit with the status of the script (of its first failed process)."""
    args = launch_command_parser().parse_args(argv)
    args.quiet = False  # quiet makes Accelerate exit 1 itself, without saying how the script ended
    try:
        launch_command(args)
    except subprocess.CalledProcessError as error:
        sys.exit(exit_status(error.returncode))
    except ChildFailedError as error:
        sys.exit(exit_status(error.get_first_failure()[1].exitcode) or 1)
    sys.exit(0)


if __name__ == "__main__":
    main()
