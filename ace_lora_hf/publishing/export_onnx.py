"""Export the ACE image and text embeddings of an ACE-LoRA model to ONNX (the command is `ace-lora-export-onnx`,
`ace_lora_hf.cli.export_onnx`). `export_model` writes into a folder:
- `vision.onnx`: `pixel_values` float32 `[batch, 3, H, W]` (as `AceLoraImageProcessor` makes them) ->
  `image_embeds` float32 `[batch, projection_dim]`.
- `text.onnx`: `input_ids` and `attention_mask` int64 `[batch, context_length]` (padded to the model's text context,
  256 for ACE-LoRA, as `AceLoraProcessor` pads) -> `text_embeds` float32 `[batch, projection_dim]`.
- `export_onnx.json`: the inputs, outputs, opset, context length, pad id and logit scale of both files, and how far
  onnxruntime's outputs were from PyTorch's on random inputs.
- with labels (`classes`): `classes.safetensors`, the zero-shot class embeddings of those labels and templates as the
  model computes them (its class side cannot be rebuilt from `text.onnx`: the templates' tokens are averaged before
  the text hypergraph), described under `classes` in `export_onnx.json`; `OnnxZeroShotClassifier` scores with them.

Both embeddings are L2-normalised, so `logit_scale * image_embeds @ text_embeds.T` are the model's logits. LoRA is
merged into the base weights before the export. Needs `pip install 'ace-lora-hf[onnx]'` (onnx, onnxscript and
onnxruntime).
"""

import importlib
import json
import logging as std_logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..errors import InvalidArgumentError, MissingDependencyError
from ..inference.onnx_zero_shot import CLASSES_TENSOR, DESCRIPTION_FILE, ExportedClasses
from ..models.ace_lora.modeling_ace_lora import AceLoraModel
from ..outputs.safe_outputs import write_text_atomic
from ..sources.checkpoints import save_tensors


logger = logging.get_logger(__name__)

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_COMMAND = "pip install 'ace-lora-hf[onnx]'"
MIN_OPSET = 18  # the oldest opset torch.onnx's exporter writes
# Traced with one batch size and checked with another, so a batch size baked into the graph cannot go unnoticed.
EXAMPLE_BATCH_SIZE = 2
CHECK_BATCH_SIZE = 1
CHECK_SEED = 0
# Above this, onnxruntime and PyTorch disagree by more than float32 reordering explains (they agree to ~1e-7).
TOLERANCE = 1e-4


def require_onnx_packages() -> None:
    """Raise a one-line `MissingDependencyError` naming the extra to install when an ONNX package is missing."""
    missing = [name for name in ONNX_PACKAGES if not _importable(name)]
    if missing:
        raise MissingDependencyError(f"ONNX export needs {', '.join(missing)} (not installed); install the onnx "
                                     f"extra: {INSTALL_COMMAND}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------- what is exported


class EmbeddingPath(nn.Module):
    """One embedding path of an [`AceLoraModel`] as a module of its own: what the exporter traces into one file."""

    file_name: str
    input_names: tuple[str, ...]
    output_name: str

    def __init__(self, model: AceLoraModel):
        super().__init__()
        self.model = model

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def description(self) -> dict:
        """What the export description says about this file besides its inputs and outputs."""
        return {}


class ImageEmbedding(EmbeddingPath):
    """The L2-normalised ACE image embedding of `pixel_values`."""

    file_name = "vision.onnx"
    input_names = ("pixel_values",)
    output_name = "image_embeds"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values).pooler_output

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        config = self.model.config.vision_config
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        return (torch.randn(batch_size, config.num_channels, height, width, generator=generator),)


class TextEmbedding(EmbeddingPath):
    """The L2-normalised ACE text embedding of `input_ids` and `attention_mask`.

    The text tower pads every text to its context length, so the exported graph takes exactly that many tokens.
    """

    file_name = "text.onnx"
    input_names = ("input_ids", "attention_mask")
    output_name = "text_embeds"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids, attention_mask).pooler_output

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Texts of random lengths (at least 3 tokens), padded to the context length."""
        config = self.model.config.text_config
        context_length, pad_token_id = config.context_length, config.pad_token_id
        input_ids = torch.randint(config.vocab_size - 1, (batch_size, context_length), generator=generator)
        input_ids += input_ids >= pad_token_id  # every id but the pad id
        lengths = torch.randint(3, context_length + 1, (batch_size, 1), generator=generator)
        attention_mask = torch.arange(context_length) < lengths
        return input_ids.masked_fill(~attention_mask, pad_token_id), attention_mask.long()

    def description(self) -> dict:
        config = self.model.config.text_config
        return {"context_length": config.context_length, "pad_token_id": config.pad_token_id,
                "note": f"Pad (or truncate) every text to context_length={config.context_length} tokens with "
                        f"pad_token_id={config.pad_token_id}; attention_mask is 1 on real tokens, 0 on padding."}


# -------------------------------------------------------------------------------------------------- the steps


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter cannot write (it would fall back to its own) or onnx does not know."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise InvalidArgumentError(f"--opset {opset}: torch.onnx exports opsets {MIN_OPSET} to {newest} here; pass "
                                   "one of them or leave --opset out.")


@contextmanager
def _quiet_constant_folding() -> Iterator[None]:
    """Hide onnxscript's 'Evaluation failed' warnings: its constant folding cannot evaluate the gather of BERT's
    default `token_type_ids` buffer and leaves that node as it is, which is correct. The check against PyTorch
    would show a real fault."""
    folding_logger = std_logging.getLogger("onnxscript.optimizer")
    level = folding_logger.level
    folding_logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        folding_logger.setLevel(level)


def export_embedding(module: EmbeddingPath, path: Path, opset: int | None = None) -> dict:
    """Export `module` to `path` with a dynamic batch axis; returns its inputs, outputs and opset."""
    batch = torch.export.Dim("batch", min=1)
    example = module.random_inputs(EXAMPLE_BATCH_SIZE, torch.Generator().manual_seed(CHECK_SEED))
    logger.info("Exporting %s to %s", type(module).__name__, path)
    with torch.no_grad(), _quiet_constant_folding():
        program = torch.onnx.export(
            module, example, path, dynamo=True, external_data=False, opset_version=opset, verbose=False,
            input_names=list(module.input_names), output_names=[module.output_name],
            dynamic_shapes={name: {0: batch} for name in module.input_names},
        )
    graph = program.model.graph
    return {"file": module.file_name, "inputs": [_describe_value(value) for value in graph.inputs],
            "outputs": [_describe_value(value) for value in graph.outputs], "opset": program.model.opset_imports[""],
            **module.description()}


def _describe_value(value) -> dict:
    """Name, dtype and shape (symbolic axes by name) of an ONNX graph input or output."""
    shape = [dim if isinstance(dim, int) else str(dim) for dim in value.shape]
    return {"name": value.name, "dtype": str(value.dtype.numpy()), "shape": shape}


def run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The one output of the ONNX file `path` on `inputs`, computed by onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, inputs)
    return output


def max_abs_difference(module: EmbeddingPath, path: Path, inputs: tuple[torch.Tensor, ...]) -> float:
    """Largest |onnxruntime - PyTorch| of the exported `module` on `inputs`."""
    with torch.no_grad():
        expected = module(*inputs).numpy()
    exported = run_onnx(path, {name: tensor.numpy() for name, tensor in zip(module.input_names, inputs)})
    return float(np.abs(exported - expected).max())


def save_class_embeddings(folder: Path, classes: ExportedClasses) -> dict:
    """Write the class embeddings into `folder`; returns their entry of the description."""
    entry = classes.description()
    save_tensors({CLASSES_TENSOR: classes.embeddings}, folder / entry["file"])
    return entry


def export_model(model: AceLoraModel, folder: Path, opset: int | None = None,
                 classes: ExportedClasses | None = None) -> dict:
    """Write both ONNX files, the class embeddings of `classes` if given, and their description into `folder`;
    returns the description."""
    description = {
        "logit_scale": model.logit_scale.item(),
        "lora_merged": True,
        "check": {"max_abs_difference": "onnxruntime (CPU) against PyTorch on random inputs", "seed": CHECK_SEED,
                  "batch_size": CHECK_BATCH_SIZE, "export_batch_size": EXAMPLE_BATCH_SIZE},
    }
    generator = torch.Generator().manual_seed(CHECK_SEED)
    for key, module in (("vision", ImageEmbedding(model).eval()), ("text", TextEmbedding(model).eval())):
        path = folder / module.file_name
        entry = export_embedding(module, path, opset)
        check_inputs = module.random_inputs(CHECK_BATCH_SIZE, generator)
        entry["max_abs_difference"] = max_abs_difference(module, path, check_inputs)
        if entry["max_abs_difference"] > TOLERANCE:
            logger.warning("%s differs from PyTorch by up to %.2e (more than %.0e); a near-tie among the "
                           "hypergraph's top-k scores on the random check inputs can cause this, a faulty export too.",
                           module.file_name, entry["max_abs_difference"], TOLERANCE)
        description[key] = entry
    if classes is not None:
        description["classes"] = save_class_embeddings(folder, classes)
    write_text_atomic(folder / DESCRIPTION_FILE, json.dumps(description, indent=2) + "\n")
    return description


__all__ = ["DESCRIPTION_FILE", "EmbeddingPath", "ImageEmbedding", "TextEmbedding", "export_embedding", "export_model",
           "max_abs_difference", "require_onnx_packages", "run_onnx", "save_class_embeddings"]
