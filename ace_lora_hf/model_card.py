"""The Hub model card (README.md with YAML metadata) of an ACE-LoRA repository."""

BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

# The paper's published results (SPEC §9): (task, dataset, metric, value).
PUBLISHED_RESULTS = (
    ("zero-shot-image-classification", "RSNA Pneumonia", "AUC", 87.19),
    ("zero-shot-image-classification", "CheXpert 5x200", "accuracy", 49.8),
    ("image-segmentation", "SIIM-ACR Pneumothorax", "Dice", 46.34),
    ("object-detection", "RSNA Pneumonia", "mAP", 21.29),
    ("zero-shot-image-classification", "MHIST", "accuracy", 57.27),
    ("zero-shot-image-classification", "LC25000 (lung)", "accuracy", 84.03),
    ("zero-shot-image-classification", "LC25000 (colon)", "accuracy", 90.39),
)

USAGE_SNIPPET = '''\
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

labels = ["No Finding", "pneumonia"]
templates = ["a chest X-ray image of {{}}.", "Findings suggesting {{}}."]
prompts = processor(text=[t.format(label) for label in labels for t in templates], return_tensors="pt")
pixels = processor(images=Image.open("chest_xray.png"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    classes = model.get_class_embeddings(prompts["input_ids"].view(len(labels), len(templates), -1)).pooler_output
    image = model.get_image_features(pixels).pooler_output
    probabilities = (model.logit_scale * image @ classes.T).softmax(dim=-1)
print(dict(zip(labels, probabilities[0].tolist())))
'''


def _metadata(repo_id: str, base_model: str) -> str:
    results = "\n".join(
        f"      - task: {{type: {task}}}\n"
        f"        dataset: {{name: {dataset}, type: {dataset.split()[0].lower()}}}\n"
        f"        metrics: [{{type: {metric.lower()}, value: {value}, name: {metric}}}]"
        for task, dataset, metric, value in PUBLISHED_RESULTS
    )
    return f"""---
license: mit
library_name: transformers
pipeline_tag: zero-shot-image-classification
base_model: {base_model}
datasets:
  - MIMIC-CXR-JPG
tags:
  - medical
  - radiology
  - chest-x-ray
  - vision-language
  - biomedclip
  - lora
  - peft
  - hypergraph
  - ace-lora
model-index:
  - name: {repo_id.split("/")[-1]}
    results:
{results}
---"""


def render_model_card(repo_id: str, base_model: str = BIOMEDCLIP) -> str:
    """README.md for `repo_id`: YAML metadata, usage that runs as written, the published results."""
    table = "\n".join(f"| {dataset} | {task} | {metric} | {value} |" for task, dataset, metric, value in PUBLISHED_RESULTS)
    return f"""{_metadata(repo_id, base_model)}

# ACE-LoRA

ACE-LoRA adapts the generalist medical vision-language model [BiomedCLIP]({"https://huggingface.co/" + base_model})
to chest X-rays with rank-stabilised LoRA (r = 4) on the attention of both towers, an attention-guided hypergraph
(ACE-HGNN) over each tower's tokens, and a label-guided InfoNCE loss; about 0.97 M trainable parameters, trained
on MIMIC-CXR. Paper: *ACE-LoRA: Graph-Attentive Context Enhancement for Parameter-Efficient Adaptation of Medical
Vision-Language Models* (Aydın, Yilmaz, Koç, Çukur, arXiv 2603.17079). Weights: the authors' release (MIT).

## Usage

```python
{USAGE_SNIPPET.format(repo_id=repo_id)}```

The ace-lora-hf package (pip install from its repository) adds DICOM loading, batched zero-shot classification and the command line in
`hf_model_inference.py` (`python hf_model_inference.py --model {repo_id} --images a.dcm b.png`).

## Results reported in the paper

| Dataset | Task | Metric | ACE-LoRA |
|---|---|---|---|
{table}

## Intended use

Research on medical vision-language models. Not a medical device; not for clinical decisions.
"""


__all__ = ["PUBLISHED_RESULTS", "render_model_card"]
