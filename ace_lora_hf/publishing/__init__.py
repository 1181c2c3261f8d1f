"""Publishing: model cards, staged Hub repositories, ONNX export."""
