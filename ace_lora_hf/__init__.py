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

from .models.ace_lora.configuration_ace_lora import AceLoraConfig, AceLoraTextConfig, AceLoraVisionConfig
from .models.ace_lora.image_processing_ace_lora import AceLoraImageProcessor
from .models.ace_lora.loss_ace_lora import binarize_labels, false_negative_mask, label_guided_infonce
from .models.ace_lora.modeling_ace_lora import (
    AceHypergraph,
    AceLoraModel,
    AceLoraOutput,
    AceLoraPreTrainedModel,
    AceLoraTextModel,
    AceLoraTokenFeatures,
    AceLoraVisionModel,
)
from .models.ace_lora.modeling_ace_lora_heads import (
    AceLoraForObjectDetection,
    AceLoraForSegmentation,
    AceLoraObjectDetectionOutput,
)
from .models.ace_lora.calibration import Calibration
from .models.ace_lora.pipeline_ace_lora import AceLoraZeroShotImageClassificationPipeline, register_pipeline
from .models.ace_lora.image_loading import load_image
from .models.ace_lora.processing_ace_lora import AceLoraProcessor
from .models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, PATHOLOGY_TEMPLATES, ZeroShotClassifier
from .sources.folders import released_model_folder
from .sources.load import LoadedModel, load


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
# AceLoraModel.from_biomedclip (remote code cannot convert BiomedCLIP itself) builds the released model here.
AceLoraModel.released_model_folder = staticmethod(released_model_folder)

__all__ = [
    "CHEST_XRAY_TEMPLATES",
    "PATHOLOGY_TEMPLATES",
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
    "Calibration",
    "LoadedModel",
    "ZeroShotClassifier",
    "binarize_labels",
    "false_negative_mask",
    "label_guided_infonce",
    "load",
    "load_image",
]
