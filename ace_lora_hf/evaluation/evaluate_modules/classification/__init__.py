"""The `classification` evaluate module (loaded by path with `evaluate.load`)."""
