"""The `detection_map` evaluate module (loaded by path with `evaluate.load`)."""
