"""Explanation pictures: the last-layer CLS attention as a heat map and the patches the hypergraph tied to CLS."""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .modeling_ace_lora import AceLoraModel
from .processing_ace_lora import AceLoraProcessor


NEIGHBOUR_COLOUR = (0, 255, 255)


def _heat_colours(values: np.ndarray) -> np.ndarray:
    """Blue (low) through green and yellow to red (high), for values in [0, 1]."""
    red = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def render_explanation(
    crop: Image.Image, cls_attention: np.ndarray, neighbours: np.ndarray | None, alpha: float = 0.45
) -> Image.Image:
    """The model's input crop beside the same crop overlaid with attention and outlined CLS neighbours."""
    grid = math.isqrt(cls_attention.shape[0])
    scores = cls_attention.reshape(grid, grid).astype(np.float64)
    scores = (scores - scores.min()) / max(scores.max() - scores.min(), 1e-12)
    heat = Image.fromarray(_heat_colours(scores)).resize(crop.size, Image.Resampling.BILINEAR)
    overlay = Image.blend(crop.convert("RGB"), heat, alpha)
    patch_width, patch_height = crop.width / grid, crop.height / grid
    draw = ImageDraw.Draw(overlay)
    for patch in [] if neighbours is None else neighbours.tolist():
        row, column = divmod(patch, grid)
        box = (column * patch_width, row * patch_height, (column + 1) * patch_width - 1, (row + 1) * patch_height - 1)
        draw.rectangle(box, outline=NEIGHBOUR_COLOUR, width=2)
    canvas = Image.new("RGB", (crop.width * 2, crop.height))
    canvas.paste(crop.convert("RGB"), (0, 0))
    canvas.paste(overlay, (crop.width, 0))
    return canvas


def explain_images(model: AceLoraModel, processor: AceLoraProcessor, images: list[Image.Image]) -> list[Image.Image]:
    """One explanation picture per (already loaded, RGB) image."""
    image_processor = processor.image_processor
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    crops = image_processor(images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    with torch.no_grad():
        cls_attention = model.vision_model.get_token_features(pixel_values.to(model.device)).cls_attention
    hypergraph = model.vision_model.hypergraph
    neighbours = None if hypergraph is None else hypergraph.cls_neighbours(cls_attention)[0] - 1
    pictures = []
    for index, crop in enumerate(crops):
        crop_image = Image.fromarray(np.moveaxis(crop, 0, -1).astype(np.uint8))
        patch_neighbours = None if neighbours is None else neighbours[index].cpu().numpy()
        pictures.append(render_explanation(crop_image, cls_attention[index].float().cpu().numpy(), patch_neighbours))
    return pictures


__all__ = ["explain_images", "render_explanation"]
