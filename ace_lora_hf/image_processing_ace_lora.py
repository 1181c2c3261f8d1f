"""Image processor for ACE-LoRA: BiomedCLIP's (open_clip's) preprocessing, pixel for pixel."""

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict


class AceLoraImageProcessor(PilBackend):
    r"""
    BiomedCLIP's preprocessing: RGB, shorter side resized to 224 (bicubic, PIL), center crop 224, scale to [0, 1],
    normalise with CLIP's mean and std. Produces `pixel_values` of shape `(batch_size, 3, 224, 224)`.

    Identical to open_clip's torchvision pipeline, including where an odd margin is split by the center crop.

    Grayscale (mode "L") images, as X-rays come from `ace_lora_hf.image_loading.load_image`, are resized and cropped
    in their one channel and become RGB afterwards: the pixel values of their RGB conversion for a third of the
    resizing work. With `do_convert_rgb=False` they stay single-channel, as every image keeps its channels.
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

    def process_image(self, image, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray:
        """Channels-first array of one image; an "L" image keeps its one channel until `_preprocess` has resized it."""
        if do_convert_rgb and isinstance(image, Image.Image) and image.mode == "L":
            return np.asarray(image)[None]
        return super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        return_tensors,
        do_convert_rgb: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """`PilBackend`'s steps, with single-channel images made RGB between the crop and the rescale."""
        processed_images = []
        for image in images:
            if do_resize:
                image = self.resize(image=image, size=size, resample=resample)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            if do_convert_rgb and image.shape[0] == 1:
                image = np.repeat(image, 3, axis=0)
            if do_rescale or do_normalize:
                image = self._rescale_and_normalize(image, do_rescale, rescale_factor, do_normalize, image_mean,
                                                    image_std)
            processed_images.append(image)
        if do_pad:
            processed_images = self.pad(processed_images, pad_size=pad_size)
        return BatchFeature(data={"pixel_values": processed_images}, tensor_type=return_tensors)

    def _rescale_and_normalize(self, image: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                               image_mean, image_std) -> np.ndarray:
        """`rescale` then `normalize`. An 8-bit image has 256 possible values per channel: both steps run on those and
        each pixel looks its result up, the same float32 numbers for a fraction of the arithmetic."""
        if image.dtype != np.uint8:
            return self._rescale_then_normalize(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        channels = image.shape[0]
        levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 1, 256))
        table = self._rescale_then_normalize(levels, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        result = np.empty(image.shape, dtype=table.dtype)
        for channel in range(channels):
            np.take(table[channel, 0], image[channel], out=result[channel])
        return result

    def _rescale_then_normalize(self, image: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                                image_mean, image_std) -> np.ndarray:
        if do_rescale:
            image = self.rescale(image, rescale_factor)
        if do_normalize:
            image = self.normalize(image, image_mean, image_std)
        return image

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Crop a channels-first image; torchvision rounds the top/left margin where transformers floors it."""
        height, width = image.shape[-2:]
        if height < size.height or width < size.width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["AceLoraImageProcessor"]
