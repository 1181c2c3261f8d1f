"""Batches of a prepared set's 8-bit pixels, and the image processor's last steps applied to them on the device."""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def stacked_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Prepared images (all of one size) as a uint8 batch `(B, C, H, W)`: one channel if all are grayscale, else 3."""
    if all(image.mode == "L" for image in images):
        return torch.from_numpy(np.stack([np.asarray(image) for image in images]))[:, None]
    arrays = [np.asarray(image.convert("RGB")) for image in images]  # a grayscale image's RGB repeats its channel
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class PixelTable:
    """The image processor's last steps (made RGB, rescaled, normalised) as a table of its output for each of the
    256 levels of each channel, computed by the processor itself, so looking pixels up gives its exact values.

    A loader of a prepared set hands over 8-bit pixels (`stacked_pixels`) and the training step looks them up where
    the batch is, on the GPU: a loader worker then only decodes a small PNG."""

    def __init__(self, image_processor):
        levels = Image.fromarray(np.arange(256, dtype=np.uint8)[None, :])
        values = image_processor(levels, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
        self.table = values[0, :, 0, :]  # (3 channels, 256 levels)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """float `pixel_values` (B, 3, H, W) of uint8 `pixels` (B, 1 or 3, H, W), on `pixels`' device."""
        table = self.table.to(pixels.device)
        indices = pixels.long()
        if pixels.shape[1] == 1:
            return table[:, indices[:, 0]].transpose(0, 1)
        return torch.stack([table[channel][indices[:, channel]] for channel in range(3)], dim=1)


__all__ = ["PixelTable", "stacked_pixels"]
