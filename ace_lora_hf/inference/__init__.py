"""Inference around the model: the images a command works on, explanations, CPU tuning (memory, fast dropout)."""
