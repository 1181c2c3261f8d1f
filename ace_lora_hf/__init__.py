"""ACE-LoRA for Hugging Face transformers: BiomedCLIP + LoRA + attention-guided hypergraphs."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_ace_lora import AceLoraConfig, AceLoraTextConfig, AceLoraVisionConfig
from .image_processing_ace_lora import AceLoraImageProcessor
from .loss_ace_lora import binarize_labels, false_negative_mask, label_guided_infonce
from .modeling_ace_lora import (
    AceHypergraph,
    AceLoraModel,
    AceLoraOutput,
    AceLoraPreTrainedModel,
    AceLoraTextModel,
    AceLoraTokenFeatures,
    AceLoraVisionModel,
)
from .modeling_ace_lora_heads import AceLoraForObjectDetection, AceLoraForSegmentation, AceLoraObjectDetectionOutput
from .pipeline_ace_lora import AceLoraZeroShotImageClassificationPipeline, register_pipeline
from .processing_ace_lora import AceLoraProcessor


for _config in (AceLoraConfig, AceLoraVisionConfig, AceLoraTextConfig):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
AutoModel.register(AceLoraConfig, AceLoraModel, exist_ok=True)
AutoModel.register(AceLoraVisionConfig, AceLoraVisionModel, exist_ok=True)
AutoModel.register(AceLoraTextConfig, AceLoraTextModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(AceLoraConfig, AceLoraModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(AceLoraConfig, AceLoraForSegmentation, exist_ok=True)
AutoModelForObjectDetection.register(AceLoraConfig, AceLoraForObjectDetection, exist_ok=True)
AutoImageProcessor.register(AceLoraConfig, image_processor_classes={"pil": AceLoraImageProcessor}, exist_ok=True)
AutoProcessor.register(AceLoraConfig, AceLoraProcessor, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the code, so a saved folder also loads as remote code.
AceLoraConfig.register_for_auto_class()
AceLoraModel.register_for_auto_class("AutoModel")
AceLoraForSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
AceLoraForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
AceLoraImageProcessor.register_for_auto_class("AutoImageProcessor")
AceLoraProcessor.register_for_auto_class("AutoProcessor")
# pipeline("zero-shot-image-classification") builds ours (stock for other models); its save_pretrained writes
# `custom_pipelines` and the pipeline code, so the saved folder serves it as remote code too.
register_pipeline()

__all__ = [
    "AceHypergraph",
    "AceLoraConfig",
    "AceLoraForObjectDetection",
    "AceLoraForSegmentation",
    "AceLoraImageProcessor",
    "AceLoraModel",
    "AceLoraObjectDetectionOutput",
    "AceLoraOutput",
    "AceLoraPreTrainedModel",
    "AceLoraProcessor",
    "AceLoraTextConfig",
    "AceLoraTextModel",
    "AceLoraTokenFeatures",
    "AceLoraVisionConfig",
    "AceLoraVisionModel",
    "AceLoraZeroShotImageClassificationPipeline",
    "binarize_labels",
    "false_negative_mask",
    "label_guided_infonce",
]
