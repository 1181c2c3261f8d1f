"""The checks every weight tensor read from a user's file passes before it reaches a model."""

import torch

from ..errors import CheckpointError


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(where: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if it is floating point and finite; otherwise a `CheckpointError` naming `where` and `name`. A bool,
    integer or float8 tensor would be cast to the model's dtype without a word (float8 loses digits, integers were
    never weights), and NaN or infinity poisons every output."""
    if tensor.dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"{where}: tensor {name} is stored as {tensor.dtype}; weights are floating point "
                              "(float32, float16 or bfloat16): use the file as it was written, or write it again.")
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{where}: tensor {name} contains NaN or infinite values.")
    return tensor


__all__ = ["WEIGHT_DTYPES", "check_weight"]
