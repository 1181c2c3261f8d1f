"""Inference around the model: the images a command works on, explanations, memory tuning for the CPU."""
