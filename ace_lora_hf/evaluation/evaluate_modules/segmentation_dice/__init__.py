"""The `segmentation_dice` evaluate module (loaded by path with `evaluate.load`)."""
