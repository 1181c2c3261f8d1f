"""Image processor for ACE-LoRA: BiomedCLIP's (open_clip's) preprocessing, pixel for pixel."""

import dataclasses
from typing import NamedTuple

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling, SizeDict


class CropWindow(NamedTuple):
    """Where a processed image comes from: the size its original was resized to, and the box (left, top, right,
    bottom) the center crop keeps of that resized image, in its pixels."""

    resized_height: int
    resized_width: int
    left: int
    top: int
    right: int
    bottom: int

    def in_original(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The crop's box in the pixels of the `height` x `width` original."""
        # Multiplied before dividing, so that a box along the image's edges is exactly its width and height.
        return (self.left * width / self.resized_width, self.top * height / self.resized_height,
                self.right * width / self.resized_width, self.bottom * height / self.resized_height)


class AceLoraImageProcessor(PilBackend):
    r"""
    BiomedCLIP's preprocessing: RGB, shorter side resized to 224 (bicubic, PIL), center crop 224, scale to [0, 1],
    normalise with CLIP's mean and std. Produces `pixel_values` of shape `(batch_size, 3, 224, 224)`.

    Identical to open_clip's torchvision pipeline, including where an odd margin is split by the center crop.

    Grayscale (mode "L") images, as X-rays come from `image_loading.load_image`, are resized and cropped
    in their one channel and become RGB afterwards: the pixel values of their RGB conversion for less than half the
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

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("size", "crop_size"):
            sides = {key: value for key, value in dataclasses.asdict(getattr(self, name)).items() if value is not None}
            if not all(isinstance(value, int) and value > 0 for value in sides.values()):
                raise ValueError(f"{name}={sides}: every side must be a positive whole number of pixels.")

    def crop_window(self, height: int, width: int) -> CropWindow:
        """The part of a `height` x `width` image that this processor keeps, by its own resize rule and center crop
        (applied to zero-copy images of row and column indices), so that boxes and pictures drawn over its output
        line up with its pixels exactly."""
        resized_height, resized_width = height, width
        if self.do_resize:
            target = self.size.shortest_edge or (self.size.height, self.size.width)
            resized_height, resized_width = get_resize_output_image_size(
                np.broadcast_to(np.uint8(0), (1, height, width)), target, default_to_square=False,
                input_data_format=ChannelDimension.FIRST)
        if not self.do_center_crop:
            return CropWindow(resized_height, resized_width, 0, 0, resized_width, resized_height)
        shape = (1, resized_height, resized_width)
        rows = np.broadcast_to(np.arange(resized_height)[None, :, None], shape)
        columns = np.broadcast_to(np.arange(resized_width)[None, None, :], shape)
        top = int(self.center_crop(rows, self.crop_size)[0, 0, 0])
        left = int(self.center_crop(columns, self.crop_size)[0, 0, 0])
        return CropWindow(resized_height, resized_width, left, top, left + self.crop_size.width,
                          top + self.crop_size.height)

    def process_image(self, image, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray | Image.Image:
        """Channels-first array of one image. An "L" image to be made RGB stays as it is: `resize` hands it to PIL
        without copying it into an array and back, and `_preprocess` makes it RGB after the crop."""
        if do_convert_rgb and isinstance(image, Image.Image) and image.mode == "L":
            return image
        return super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)

    def resize(self, image: np.ndarray | Image.Image, size: SizeDict, resample=None, reducing_gap: int | None = None,
               **kwargs) -> np.ndarray:
        """`PilBackend.resize`; an "L" image kept by `process_image` is resized by PIL where it is when its output size
        follows from its shortest edge (BiomedCLIP's setting), else it becomes an array first."""
        if isinstance(image, Image.Image):
            if size.shortest_edge and not size.longest_edge and isinstance(resample, int):
                return self._resize_shortest_edge(image, size.shortest_edge, resample, reducing_gap)
            image = np.asarray(image)[None]
        return super().resize(image, size, resample, reducing_gap=reducing_gap, **kwargs)

    @staticmethod
    def _resize_shortest_edge(image: Image.Image, shortest_edge: int, resample: int,
                              reducing_gap: int | None) -> np.ndarray:
        # transformers works out the output size from an array's shape: a read-only view of one zero has it for free.
        shape_only = np.broadcast_to(np.uint8(0), (1, image.height, image.width))
        height, width = get_resize_output_image_size(shape_only, shortest_edge, default_to_square=False,
                                                     input_data_format=ChannelDimension.FIRST)
        return np.asarray(image.resize((width, height), resample, reducing_gap=reducing_gap))[None]

    def _preprocess(
        self,
        images: list[np.ndarray | Image.Image],
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
            elif isinstance(image, Image.Image):
                image = np.asarray(image)[None]
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


__all__ = ["AceLoraImageProcessor", "CropWindow"]
