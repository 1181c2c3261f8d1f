"""Processor for ACE-LoRA: the BiomedCLIP image processor and PubMedBERT's (uncased BERT) tokenizer."""

from transformers import ProcessorMixin


class AceLoraProcessor(ProcessorMixin):
    r"""
    Wraps an [`AceLoraImageProcessor`] and a BERT tokenizer. Texts are padded and truncated to the model's text
    context (`context_length`, the model config's `text_config.context_length`), as BiomedCLIP was trained: every
    caller tokenizes through the processor (`processor(text=...)`) rather than repeating these settings.

    Args:
        image_processor ([`AceLoraImageProcessor`]): The image processor.
        tokenizer ([`BertTokenizer`] or [`BertTokenizerFast`]): The tokenizer.
        context_length (`int`, *optional*, defaults to 256): Tokens per text after padding and truncation; saved in
            `processor_config.json` (folders without it are BiomedCLIP's 256).

    Example:

    ```python
    >>> from transformers import AutoProcessor

    >>> processor = AutoProcessor.from_pretrained("path/to/ace-lora")  # a folder written by ace-lora-convert
    >>> inputs = processor(text=["a chest X-ray image of pneumonia."], images=image, return_tensors="pt")
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, context_length: int = 256, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.context_length = context_length

    @property
    def text_kwargs(self) -> dict:
        """The tokenizer settings `ProcessorMixin` applies to every text (its per-processor defaults)."""
        return {"padding": "max_length", "truncation": True, "max_length": self.context_length}


__all__ = ["AceLoraProcessor"]
