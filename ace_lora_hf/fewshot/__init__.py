"""Few-shot adaptation of a loaded ACE-LoRA model: K labelled images per class (or a share of a training table),
several seeds, zero-shot / linear-probe / prompt-initialised-head results (`ace-lora-fewshot`)."""
