"""Processor for ACE-LoRA: the BiomedCLIP image processor and PubMedBERT's (uncased BERT) tokenizer."""

from transformers import ProcessorMixin


class AceLoraProcessor(ProcessorMixin):
    r"""
    Wraps an [`AceLoraImageProcessor`] and a BERT tokenizer. Texts are padded and truncated to the model's
    256-token context, as BiomedCLIP was trained.

    Example:

    ```python
    >>> processor = AutoProcessor.from_pretrained("aydnarda/ACE-LoRA", trust_remote_code=True)
    >>> inputs = processor(text=["a chest X-ray image of pneumonia."], images=image, return_tensors="pt")
    ```
    """

    text_kwargs = {"padding": "max_length", "truncation": True, "max_length": 256}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)


__all__ = ["AceLoraProcessor"]
