"""Inference around the model: the images a command works on, explanations, zero-shot with ONNX files, CPU tuning
(memory, fast dropout)."""
