"""Image processor for ACE-LoRA: BiomedCLIP's (open_clip's) preprocessing, pixel for pixel."""

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict


class AceLoraImageProcessor(PilBackend):
    r"""
    BiomedCLIP's preprocessing: RGB, shorter side resized to 224 (bicubic, PIL), center crop 224, scale to [0, 1],
    normalise with CLIP's mean and std. Produces `pixel_values` of shape `(batch_size, 3, 224, 224)`.

    Identical to open_clip's torchvision pipeline, including where an odd margin is split by the center crop.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Crop a channels-first image; torchvision rounds the top/left margin where transformers floors it."""
        height, width = image.shape[-2:]
        if height < size.height or width < size.width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["AceLoraImageProcessor"]
