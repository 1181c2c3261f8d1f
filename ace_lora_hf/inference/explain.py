"""Explanations of a zero-shot prediction: where the vision tower's CLS token looks, which patches the hypergraph ties
to it, and which patches resemble each label.

`explain` computes an [`Explanation`] (numbers only, one forward pass of the vision tower); `plot_explanation` draws
it with matplotlib (`pip install 'ace-lora-hf[plot]'`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError, MissingDependencyError
from ..models.ace_lora.image_loading import load_image
from ..models.ace_lora.batch_inference import ImageInput
from ..models.ace_lora.hypergraph_ace_lora import AceHypergraph
from ..models.ace_lora.zero_shot import ZeroShotClassifier


if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# Fixed colour scales, the same for every image, so that pictures can be compared.
# CLS attention relative to a uniform share, on a log scale from 1/8 to 8 times it (white: uniform).
ATTENTION_TICKS = {1 / 8: "1/8", 1 / 4: "1/4", 1 / 2: "1/2", 1: "1", 2: "2", 4: "4", 8: "8"}
ATTENTION_RANGE = (min(ATTENTION_TICKS), max(ATTENTION_TICKS))
# Patch-level label probabilities: 0 to 1, white at chance (1 / number of labels).
PATCH_PROBABILITY_RANGE = (0.0, 1.0)
HEAT_COLOURS = "RdBu_r"  # blue below the neutral value, red above
NEIGHBOUR_COLOUR = "#00e5ff"
PANEL_INCHES = 4.2
FIGURE_DPI = 150  # 1890 pixels wide: a full-width slide
COLUMNS = 3
PLOT_EXTRA_HINT = "pip install 'ace-lora-hf[plot]'"


@dataclass
class Explanation:
    r"""
    What an explanation picture shows, as numbers. Patch maps are `[grid, grid]` arrays over the model's crop, in the
    row-major order of the ViT's patches; `grid` is 14 for ViT-B/16 at 224 pixels.

    image (`PIL.Image.Image`):
        The image as loaded (`load_image`: mode "L" or "RGB"), at its original size.
    crop (`PIL.Image.Image`):
        What the model sees: the image resized and center-cropped by the processor, as 8-bit RGB.
    crop_box (`tuple[float, float, float, float]`):
        `(left, top, right, bottom)` of the crop in the original image's pixels.
    relative_attention (`np.ndarray` of shape `(grid, grid)`):
        The share of the last layer's CLS attention that each patch receives, times the number of patches: 1 is a
        uniform share. The share is the softmax over patches of the head-averaged pre-softmax scores, the row the
        hypergraph is built from: those scores are defined only up to a constant per image (the softmax and the
        top-k ignore it), the share is not, and on the `top_k` linked patches, renormalised, it equals their
        hypergraph weights.
    linked_patches (`np.ndarray` of shape `(top_k,)`):
        0-based patch indices that the hypergraph links to CLS (`AceHypergraph.cls_neighbours`), strongest first;
        empty for a model without a vision hypergraph.
    link_weights (`np.ndarray` of shape `(top_k,)`):
        Their hypergraph weights (summing to 1).
    labels (`tuple[str, ...]`), probabilities (`np.ndarray` of shape `(num_labels,)`):
        The zero-shot probabilities, as `ZeroShotClassifier` computes them.
    patch_similarity (`np.ndarray` of shape `(num_labels, grid, grid)`):
        Cosine similarity of each projected patch token with each label's class embedding.
    patch_probabilities (`np.ndarray` of shape `(num_labels, grid, grid)`):
        For each patch, the zero-shot probabilities of the labels were that patch token the image embedding: the
        softmax over labels of `logit_scale * patch_similarity`. Red where a patch speaks for the label.
    """

    image: Image.Image
    crop: Image.Image
    crop_box: tuple[float, float, float, float]
    relative_attention: np.ndarray
    linked_patches: np.ndarray
    link_weights: np.ndarray
    labels: tuple[str, ...]
    probabilities: np.ndarray
    patch_similarity: np.ndarray
    patch_probabilities: np.ndarray

    @property
    def prediction(self) -> str:
        return self.labels[int(self.probabilities.argmax())]

    @property
    def grid_size(self) -> int:
        return self.relative_attention.shape[0]


def _model_view(image_processor, image: Image.Image) -> Image.Image:
    crop = image_processor([image], do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return Image.fromarray(np.moveaxis(crop, 0, -1).astype(np.uint8))


def _links(hypergraph: AceHypergraph | None, cls_attention: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if hypergraph is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    tokens, weights = hypergraph.cls_neighbours(cls_attention)
    return (tokens[0] - 1).cpu().numpy(), weights[0].cpu().numpy()


@torch.no_grad()
def explain(
    classifier: ZeroShotClassifier, image: ImageInput, labels: Sequence[str], name: str | None = None
) -> Explanation:
    """Classify one image against `labels` and record what explains the result (one vision forward pass).

    Args:
        classifier: gives the model, the processor, the templates and the cached class embeddings.
        image: a path, the file's bytes or a PIL image (DICOM included, see `load_image`).
        labels: at least two class names.
        name: how errors refer to the image (defaults to the path).
    """
    if len(labels) < 2:
        raise InvalidArgumentError(f"Zero-shot classification needs at least two labels; got {list(labels)}.")
    model, image_processor = classifier.model, classifier.processor.image_processor
    image = load_image(image, name)
    pixel_values = image_processor([image], return_tensors="pt")["pixel_values"].to(classifier.device)
    features = model.vision_model.get_token_features(pixel_values)
    classes = classifier.class_embeddings(labels).float()
    logit_scale = model.logit_scale.detach().float()
    probabilities = (logit_scale * model.vision_model.pool(features) @ classes.T).softmax(dim=-1)[0]
    similarity = features.tokens[0, 1:].float() @ classes.T  # [patches, labels]
    cls_attention = features.cls_attention[0].float()
    grid = math.isqrt(cls_attention.numel())
    linked_patches, link_weights = _links(model.vision_model.hypergraph, features.cls_attention)
    return Explanation(
        image=image,
        crop=_model_view(image_processor, image),
        crop_box=image_processor.crop_window(image.height, image.width).in_original(image.height, image.width),
        relative_attention=(cls_attention.softmax(dim=-1) * cls_attention.numel()).view(grid, grid).cpu().numpy(),
        linked_patches=linked_patches,
        link_weights=link_weights,
        labels=tuple(labels),
        probabilities=probabilities.cpu().numpy(),
        patch_similarity=similarity.T.reshape(-1, grid, grid).cpu().numpy(),
        patch_probabilities=(logit_scale * similarity).softmax(dim=-1).T.reshape(-1, grid, grid).cpu().numpy(),
    )


# ------------------------------------------------------------------------------------------------------ drawing


def require_plotting() -> None:
    """Refuse, in one line naming the extra, where matplotlib is missing (checked before any work)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"Drawing explanations needs matplotlib: {PLOT_EXTRA_HINT}") from None


def _new_figure(width_inches: float, height_inches: float) -> "Figure":
    require_plotting()
    from matplotlib.figure import Figure

    # A bare `Figure` (not pyplot's) holds no global state, so that a web server can draw in several threads.
    return Figure(figsize=(width_inches, height_inches), dpi=FIGURE_DPI, layout="constrained")


def _show_image(axes: "Axes", image: Image.Image, extent: tuple[float, float, float, float]) -> None:
    axes.imshow(image, cmap="gray" if image.mode == "L" else None, extent=extent, interpolation="antialiased")
    axes.set_xticks([])
    axes.set_yticks([])


def _draw_original(axes: "Axes", explanation: Explanation) -> None:
    from matplotlib.patches import Rectangle

    image = explanation.image
    preview = image.copy()
    preview.thumbnail((1024, 1024))  # drawn at most about 600 pixels wide; spares matplotlib a 4000² radiograph
    _show_image(axes, preview, (0, image.width, image.height, 0))
    left, top, right, bottom = explanation.crop_box
    axes.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor=NEIGHBOUR_COLOUR,
                             linestyle="--", linewidth=1.5))
    whole = explanation.crop_box == (0, 0, image.width, image.height)
    seen = "the model sees all of it, resized" if whole else "dashed: the part the model sees"
    axes.set_title(f"Input, {image.width}×{image.height} px\n({seen})")


def _outline_links(axes: "Axes", explanation: Explanation, numbered: bool) -> None:
    from matplotlib.patches import Rectangle

    patch = explanation.crop.width / explanation.grid_size
    for rank, index in enumerate(explanation.linked_patches.tolist(), start=1):
        row, column = divmod(index, explanation.grid_size)
        axes.add_patch(Rectangle((column * patch, row * patch), patch, patch, fill=False, edgecolor=NEIGHBOUR_COLOUR,
                                 linewidth=1.5))
        if numbered:
            axes.text((column + 0.5) * patch, (row + 0.5) * patch, str(rank), color=NEIGHBOUR_COLOUR, fontsize=8,
                      fontweight="bold", ha="center", va="center")


def _draw_links(axes: "Axes", explanation: Explanation) -> None:
    crop = explanation.crop
    _show_image(axes, crop, (0, crop.width, crop.height, 0))
    _outline_links(axes, explanation, numbered=True)
    count = len(explanation.linked_patches)
    axes.set_title(f"Model's view, {crop.width}×{crop.height} px\n(numbered: the hypergraph's links to CLS)")
    weights = "  ".join(f"{rank}: {weight:.3f}" for rank, weight in enumerate(explanation.link_weights, start=1))
    axes.set_xlabel(f"link weights  {weights}" if count else "this model has no vision hypergraph")


def _draw_heat_map(axes: "Axes", values: np.ndarray, explanation: Explanation, norm):
    crop = explanation.crop
    image = axes.imshow(values, cmap=HEAT_COLOURS, norm=norm, interpolation="nearest",
                        extent=(0, crop.width, crop.height, 0))
    axes.set_xticks([])
    axes.set_yticks([])
    _outline_links(axes, explanation, numbered=False)
    return image


def _draw_attention(axes: "Axes", explanation: Explanation) -> None:
    from matplotlib.colors import LogNorm

    heat = _draw_heat_map(axes, explanation.relative_attention, explanation, LogNorm(*ATTENTION_RANGE))
    colour_bar = axes.figure.colorbar(heat, ax=axes, extend="both", shrink=0.85)
    colour_bar.set_ticks(list(ATTENTION_TICKS), labels=list(ATTENTION_TICKS.values()))
    colour_bar.minorticks_off()
    colour_bar.set_label(f"share × {explanation.relative_attention.size} patches (1 = uniform)")
    axes.set_title("CLS attention, last layer\n(share of attention per patch)")


def _draw_label_maps(figure: "Figure", panels: np.ndarray, explanation: Explanation) -> None:
    from matplotlib.colors import TwoSlopeNorm

    chance = 1 / len(explanation.labels)
    norm = TwoSlopeNorm(chance, *PATCH_PROBABILITY_RANGE)
    prediction = int(explanation.probabilities.argmax())
    heat = None
    for index, (axes, label) in enumerate(zip(panels, explanation.labels)):
        heat = _draw_heat_map(axes, explanation.patch_probabilities[index], explanation, norm)
        predicted = " (prediction)" if index == prediction else ""
        axes.set_title(f"{label}\np = {explanation.probabilities[index]:.3f}{predicted}",
                       fontweight="bold" if predicted else "normal")
    colour_bar = figure.colorbar(heat, ax=list(panels), extend="neither", shrink=0.85)
    colour_bar.set_label(f"patch-level P(label); white = chance ({chance:.2f})")


def plot_explanation(explanation: Explanation, title: str | None = None) -> "Figure":
    """A matplotlib figure of `explanation`: the input with the model's crop, the hypergraph's linked patches, the CLS
    attention and one patch-probability map per label, each heat map on its fixed colour scale.

    Save it with `figure.savefig("picture.png")` (150 dpi, slide-sized).
    """
    rows = 1 + math.ceil(len(explanation.labels) / COLUMNS)
    figure = _new_figure(PANEL_INCHES * COLUMNS, PANEL_INCHES * rows)
    axes = figure.subplots(rows, COLUMNS)
    _draw_original(axes[0, 0], explanation)
    _draw_links(axes[0, 1], explanation)
    _draw_attention(axes[0, 2], explanation)
    label_panels = axes[1:].ravel()
    _draw_label_maps(figure, label_panels[: len(explanation.labels)], explanation)
    for unused in label_panels[len(explanation.labels):]:
        unused.set_axis_off()
    best = explanation.probabilities.max()
    heading = f"Prediction: {explanation.prediction} (p = {best:.3f})"
    figure.suptitle(f"{title}: {heading}" if title else heading, fontsize="x-large")
    return figure


__all__ = ["Explanation", "explain", "plot_explanation", "require_plotting"]
