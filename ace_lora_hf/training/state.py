"""What a resumable checkpoint holds beside the trained weights: the progress of the run, the optimizer's state and
every process's random state, as safetensors and JSON (nothing is unpickled: Accelerate's `load_state` unpickles
registered objects with `weights_only=False`, which is why it is not used)."""

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..outputs.safe_outputs import write_json_atomic
from ..sources.checkpoints import read_json, read_tensors, save_tensors


OPTIMIZER_STATE = "optimizer.safetensors"
# The gradients summed so far in an unfinished accumulation window (--gradient_accumulation_steps), per process.
ACCUMULATED_GRADIENTS = "accumulated_gradients.safetensors"
RANDOM_STATES = "random_states.safetensors"
TRAINING_STATE = "training_state.json"  # progress, scheduler, the optimizer's other values, the run's settings


@dataclass
class TrainingProgress:
    """Where training stands; saved with every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # batches of the current epoch already consumed
    completed_steps: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    best_score: float | None = None  # lower is better: a loss, or a metric with its sign flipped
    best_epoch: int | None = None
    best_step: int | None = None
    non_finite_steps: int = 0
    skipped_batches: int = 0
    skipped_images: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        """A hand-edited or foreign training state is refused here rather than failing later, mid-run."""
        for name, value in asdict(self).items():
            if name == "history":
                valid = isinstance(value, list) and all(isinstance(record, dict) for record in value)
            elif name in ("epoch_loss_sum", "best_score"):
                valid = (value is None and name == "best_score") or (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            else:
                valid = (value is None and name in ("best_epoch", "best_step")) or (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0)
            if not valid:
                raise ValueError(f"progress.{name} is {value!r}")


def write_training_state(folder: Path, values: dict, optimizer_state: dict,
                         random_states: list[tuple[dict[str, torch.Tensor], dict]]) -> None:
    """Write `values` (JSON), the optimizer's `state_dict` and every process's `random_state()` into `folder`."""
    optimizer_tensors, optimizer_values = _split_optimizer_state(optimizer_state)
    save_tensors(optimizer_tensors, folder / OPTIMIZER_STATE)
    save_tensors({f"process_{index}.{name}": tensor for index, (tensors, _) in enumerate(random_states)
                  for name, tensor in tensors.items()}, folder / RANDOM_STATES)
    write_json_atomic(folder / TRAINING_STATE, {**values, "optimizer": optimizer_values,
                                                "random_states": [values for _, values in random_states]})


def read_training_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What `write_training_state` wrote: its values and the tensors of the optimizer (for `join_optimizer_state`)
    and of the random states (for `set_random_state`). Every file is read before anything is used."""
    values = read_json(folder / TRAINING_STATE)
    if not isinstance(values, dict):
        raise CheckpointError(f"{folder / TRAINING_STATE}: holds a {type(values).__name__}, not the mapping this "
                              "package writes; resume another checkpoint or start again.")
    return values, read_tensors(folder / OPTIMIZER_STATE), read_tensors(folder / RANDOM_STATES)


def write_accumulated_gradients(folder: Path, gradients: list[dict[str, torch.Tensor]]) -> None:
    """Every process's gradients of a checkpoint written inside an accumulation window (nothing at a window's end,
    where the optimizer has stepped and the gradients are zero)."""
    if any(gradients):
        save_tensors({f"process_{index}.{name}": tensor for index, own in enumerate(gradients)
                      for name, tensor in own.items()}, folder / ACCUMULATED_GRADIENTS)


def read_accumulated_gradients(folder: Path, process_index: int) -> dict[str, torch.Tensor]:
    """This process's gradients that `write_accumulated_gradients` saved ({} where there are none)."""
    if not (folder / ACCUMULATED_GRADIENTS).exists():
        return {}
    prefix = f"process_{process_index}."
    return {key[len(prefix):]: tensor for key, tensor in read_tensors(folder / ACCUMULATED_GRADIENTS).items()
            if key.startswith(prefix)}


def random_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch's as tensors, Python's and NumPy's as JSON values."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda_{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())})
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return tensors, {"python": random.getstate(), "numpy": numpy_state}


def set_random_state(tensors: dict[str, torch.Tensor], values: dict, process_index: int) -> bool:
    """Restore the RNG states of process `process_index` from what `read_training_state` returned; False when the
    checkpoint holds none for it (it was written by fewer processes)."""
    if process_index >= len(values):
        return False
    prefix = f"process_{process_index}."
    own = {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
    torch.set_rng_state(own["torch"])
    cuda = [own[f"cuda_{index}"] for index in range(len(own) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = values[process_index]["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(values[process_index]["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    return True


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's `state_dict` as tensors (`"{parameter}.{name}"`) and JSON values."""
    tensors, values = {}, {}
    for parameter, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{parameter}.{name}"] = value
            else:
                values.setdefault(str(parameter), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    """The optimizer's `state_dict` from its tensors and the values `write_training_state` saved."""
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        parameter, name = key.split(".", 1)
        state.setdefault(int(parameter), {})[name] = tensor
    for parameter, entries in saved["values"].items():
        state.setdefault(int(parameter), {}).update(entries)
    return {"state": state, "param_groups": saved["param_groups"]}


__all__ = ["OPTIMIZER_STATE", "RANDOM_STATES", "TRAINING_STATE", "TrainingProgress", "join_optimizer_state",
           "random_state", "read_training_state", "set_random_state", "write_training_state"]
