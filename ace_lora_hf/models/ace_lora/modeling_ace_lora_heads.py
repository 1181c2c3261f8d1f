"""Downstream heads on the frozen ACE-LoRA image encoder: semantic segmentation and object detection."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.image_transforms import center_to_corners_format, corners_to_center_format
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import ModelOutput

from .configuration_ace_lora import AceLoraConfig
from .modeling_ace_lora import AceLoraPreTrainedModel, AceLoraVisionModel


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(8, out_channels), nn.ReLU())


class AceLoraHeadModel(AceLoraPreTrainedModel):
    """A task head on the ACE-LoRA image encoder (ViT + LoRA, without the text tower, projection or hypergraph).

    The encoder is frozen; only the head trains. Loads from an `AceLoraModel` folder as well: the text tower, the
    projections, the hypergraphs and the logit scale of such a folder are not used and are skipped.
    """

    base_model_prefix = ""
    input_modalities = ("image",)
    main_input_name = "pixel_values"
    _keys_to_ignore_on_load_unexpected = [
        r"^(ace_lora\.)?(text_model|text_projection|text_hypergraph|visual_projection|vision_hypergraph)\.",
        r"^(ace_lora\.)?logit_scale$",
    ]

    def __init__(self, config: AceLoraConfig):
        super().__init__(config)
        self.vision_model = AceLoraVisionModel._from_config(config.vision_config, add_embedding_head=False)

    def _is_trainable(self, parameter_name: str) -> bool:
        return not parameter_name.startswith("vision_model.")

    def feature_maps(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Patch tokens after the given (1-based) ViT layers as `[B, hidden, H/patch, W/patch]` maps."""
        side = pixel_values.shape[-1] // self.config.vision_config.patch_size
        hidden_states = self.vision_model.backbone_outputs(pixel_values, output_hidden_states=layers).hidden_states
        return [hidden_states[layer][:, 1:].float().transpose(1, 2).unflatten(2, (side, side)) for layer in layers]


# ------------------------------------------------------------------------------------------------ segmentation


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of binary `logits` against 0/1 `targets`, both `[B, H, W]`, averaged over images."""
    probabilities = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    overlap = (probabilities * targets).sum(1)
    return (1 - (2 * overlap + epsilon) / (probabilities.sum(1) + targets.sum(1) + epsilon)).mean()


class AceLoraForSegmentation(AceLoraHeadModel):
    r"""
    Binary semantic segmentation (e.g. SIIM pneumothorax) on the frozen ACE-LoRA image encoder: patch tokens of
    several ViT depths (`config.head_feature_layers`) fused by a decoder that upsamples step by step from the
    patch grid to the input resolution. `labels` (`[B, H, W]`, 0/1) switch on the Dice + BCE loss; `logits` are
    `[B, 1, H, W]` at the input resolution.
    """

    def __init__(self, config: AceLoraConfig):
        super().__init__(config)
        hidden, width = config.vision_config.hidden_size, config.head_hidden_size
        levels = len(config.head_feature_layers)
        self.lateral = nn.ModuleList(nn.Conv2d(hidden, width, 1) for _ in range(levels))
        self.fuse = nn.ModuleList(_conv_block(width, width) for _ in range(levels))
        self.classifier = nn.Conv2d(width, 1, 1)
        self.post_init()
        self.mark_trainable_parameters()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> SemanticSegmenterOutput:
        with torch.no_grad():
            features = self.feature_maps(pixel_values, list(self.config.head_feature_layers))
        decoded = self.fuse[-1](self.lateral[-1](features[-1]))
        for lateral, fuse, feature in zip(self.lateral[-2::-1], self.fuse[-2::-1], features[-2::-1]):
            decoded = F.interpolate(decoded, scale_factor=2, mode="bilinear", align_corners=False)
            decoded = fuse(decoded + F.interpolate(lateral(feature), size=decoded.shape[-2:], mode="bilinear",
                                                   align_corners=False))
        logits = F.interpolate(self.classifier(decoded), size=pixel_values.shape[-2:], mode="bilinear",
                               align_corners=False)
        loss = None
        if labels is not None:
            labels = labels.float()
            loss = dice_loss(logits[:, 0], labels) + F.binary_cross_entropy_with_logits(logits[:, 0], labels)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


# ------------------------------------------------------------------------------------------------ box geometry
# Boxes are corner boxes (x1, y1, x2, y2) in pixels unless a name says otherwise; the centre-size form of the model's
# outputs and targets converts with transformers' `center_to_corners_format` / `corners_to_center_format`. The
# detection head, the fine-tuning data and `metrics.detection_map` all measure boxes with these functions.


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of `[..., 4]` corner boxes (x1, y1, x2, y2); an inverted box has area 0."""
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)


def _intersection_and_union(boxes: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of corner boxes, broadcast over the leading dimensions."""
    overlap = torch.cat([torch.maximum(boxes[..., :2], others[..., :2]),
                         torch.minimum(boxes[..., 2:], others[..., 2:])], -1)
    intersection = box_area(overlap)
    return intersection, box_area(boxes) + box_area(others) - intersection


def box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU `[N, M]` of `[N, 4]` and `[M, 4]` corner boxes (x1, y1, x2, y2)."""
    intersection, union = _intersection_and_union(boxes[:, None], others[None])
    return intersection / union.clamp(min=1e-9)


def generalized_iou_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean generalised-IoU loss of matching `[N, 4]` corner box pairs."""
    intersection, union = _intersection_and_union(predicted, target)
    enclosing = torch.cat([torch.minimum(predicted[..., :2], target[..., :2]),
                           torch.maximum(predicted[..., 2:], target[..., 2:])], -1)
    enclosing_area = box_area(enclosing).clamp(min=1e-9)
    iou = intersection / union.clamp(min=1e-9)
    return (1 - iou + (enclosing_area - union) / enclosing_area).mean()


def non_maximum_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept, highest score first (torchvision's `nms`, which is unavailable on CPU torch)."""
    order = scores.argsort(descending=True)
    keep = []
    while order.numel():
        best = order[0]
        keep.append(best)
        if order.numel() == 1:
            break
        overlaps = box_iou(boxes[best][None], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou_threshold]
    return torch.stack(keep) if keep else torch.empty(0, dtype=torch.long)


# --------------------------------------------------------------------------------------------------- detection


@dataclass
class AceLoraObjectDetectionOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): focal classification + GIoU box + centerness loss (with `labels`).
    logits (`torch.FloatTensor` of shape `(batch_size, num_locations, num_labels)`): class logits per location.
    pred_boxes (`torch.FloatTensor` of shape `(batch_size, num_locations, 4)`): boxes as normalised
        (center_x, center_y, width, height), like DETR's.
    centerness (`torch.FloatTensor` of shape `(batch_size, num_locations)`): centerness logits.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    centerness: torch.FloatTensor | None = None


def _per_class_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float):
    """Indices kept by non-maximum suppression within each class."""
    kept = [torch.nonzero(labels == label)[:, 0][non_maximum_suppression(boxes[labels == label],
                                                                          scores[labels == label], iou_threshold)]
            for label in labels.unique()]
    return torch.cat(kept) if kept else labels.new_empty(0)


def _flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """`[B, C, H, W]` maps of every level to one `[B, sum(H*W), C]` tensor."""
    return torch.cat([level.flatten(2).transpose(1, 2) for level in maps], dim=1)


class AceLoraForObjectDetection(AceLoraHeadModel):
    r"""
    Anchor-free (FCOS-style) detection on the frozen ACE-LoRA image encoder: a simple feature pyramid from the last
    ViT layer's patch grid (strides 8, 16 and 32 for 16-pixel patches), one shared head predicting per location
    class logits, distances to the box sides and centerness. `labels` are DETR-style: one dict per image with
    `class_labels` (`[n]`) and `boxes` (`[n, 4]`, normalised center_x, center_y, width, height).
    Use [`post_process_object_detection`] for boxes in pixels after score threshold and non-maximum suppression.
    """

    def __init__(self, config: AceLoraConfig):
        super().__init__(config)
        hidden, width = config.vision_config.hidden_size, config.head_hidden_size
        self.pyramid = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(hidden, width, 2, stride=2), nn.GroupNorm(8, width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(hidden, width, 1), nn.GroupNorm(8, width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(hidden, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU()),
        ])
        self.tower = nn.Sequential(_conv_block(width, width), _conv_block(width, width))
        self.class_logits = nn.Conv2d(width, config.num_labels, 3, padding=1)
        self.box_distances = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness_logits = nn.Conv2d(width, 1, 3, padding=1)
        self.post_init()
        self.mark_trainable_parameters()

    @property
    def strides(self) -> tuple[int, int, int]:
        patch = self.config.vision_config.patch_size
        return patch // 2, patch, patch * 2

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "class_logits", None):  # a 1% prior for the rare positive locations
            init.constant_(module.bias, -math.log(99))

    def _locations(self, sizes: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel centres of every location of every level `[L, 2]` and each location's stride `[L]`."""
        points, strides = [], []
        for (height, width), stride in zip(sizes, self.strides):
            ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                    indexing="ij")
            points.append(torch.stack([xs, ys], -1).flatten(0, 1).float() * stride + stride / 2)
            strides.append(torch.full((height * width,), float(stride), device=device))
        return torch.cat(points), torch.cat(strides)

    def forward(self, pixel_values: torch.Tensor, labels: list[dict] | None = None, **kwargs):
        with torch.no_grad():
            (feature,) = self.feature_maps(pixel_values, [self.config.vision_config.num_hidden_layers])
        levels = [self.tower(level(feature)) for level in self.pyramid]
        logits = _flatten_levels([self.class_logits(level) for level in levels])
        centerness = _flatten_levels([self.centerness_logits(level) for level in levels])[..., 0]
        points, strides = self._locations([level.shape[-2:] for level in levels], pixel_values.device)
        distances = _flatten_levels([self.box_distances(level) for level in levels]).float().exp()
        distances = distances * strides[None, :, None]
        corners = torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)
        size = pixel_values.shape[-1]
        pred_boxes = corners_to_center_format(corners) / size
        loss = None if labels is None else self._loss(logits, corners, centerness, points, strides, labels, size)
        return AceLoraObjectDetectionOutput(loss=loss, logits=logits, pred_boxes=pred_boxes, centerness=centerness)

    def _targets(self, points, strides, target: dict, size: int):
        """Per location: class (-1 background), its box in pixels and the centerness target."""
        boxes = center_to_corners_format(target["boxes"].to(points.device).float() * size)
        classes = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
        if boxes.numel() == 0:
            return classes, points.new_zeros(points.shape[0], 4), points.new_zeros(points.shape[0])
        left_top = points[:, None] - boxes[None, :, :2]
        right_bottom = boxes[None, :, 2:] - points[:, None]
        sides = torch.cat([left_top, right_bottom], -1)  # [L, n, 4]
        inside = sides.min(-1).values > 0
        # Each level takes the boxes whose longest side distance fits its stride (FCOS's size ranges).
        longest = sides.max(-1).values
        fits = (longest > strides[:, None] * 2) | (strides[:, None] == min(self.strides))
        fits &= (longest <= strides[:, None] * 8) | (strides[:, None] == max(self.strides))
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand_as(inside)
        area = torch.where(inside & fits, area, torch.full_like(area, float("inf")))
        best_area, best = area.min(dim=1)
        positive = torch.isfinite(best_area)
        classes[positive] = target["class_labels"].to(points.device)[best[positive]]
        matched = sides[torch.arange(len(points)), best]
        centerness = ((matched[:, [0, 2]].min(-1).values / matched[:, [0, 2]].max(-1).values.clamp(min=1e-9))
                      * (matched[:, [1, 3]].min(-1).values / matched[:, [1, 3]].max(-1).values.clamp(min=1e-9))
                      ).clamp(min=0).sqrt()
        return classes, boxes[best], centerness

    def _loss(self, logits, corners, centerness, points, strides, labels, size) -> torch.Tensor:
        total_classification, total_box, total_centerness, positives = 0.0, 0.0, 0.0, 0
        for index, target in enumerate(labels):
            classes, boxes, centerness_target = self._targets(points, strides, target, size)
            one_hot = F.one_hot(classes.clamp(min=0), logits.shape[-1]).float() * (classes >= 0)[:, None]
            total_classification = total_classification + _focal_loss(logits[index].float(), one_hot)
            positive = classes >= 0
            positives += int(positive.sum())
            if positive.any():
                total_box = total_box + generalized_iou_loss(corners[index][positive], boxes[positive]) * positive.sum()
                total_centerness = total_centerness + F.binary_cross_entropy_with_logits(
                    centerness[index][positive].float(), centerness_target[positive], reduction="sum")
        normaliser = max(positives, 1)
        return (total_classification + total_box + total_centerness) / normaliser

    @torch.no_grad()
    def post_process_object_detection(
        self,
        outputs: AceLoraObjectDetectionOutput,
        threshold: float = 0.05,
        target_sizes: list[tuple[int, int]] | None = None,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image: `scores`, `labels` and `boxes` (x1, y1, x2, y2; in `target_sizes` pixels if given, else
        normalised) above `threshold`, after non-maximum suppression per class."""
        scores_all = (outputs.logits.sigmoid() * outputs.centerness.sigmoid()[..., None]).sqrt()
        results = []
        for index, scores in enumerate(scores_all):
            boxes = center_to_corners_format(outputs.pred_boxes[index]).clamp(0, 1)
            if target_sizes is not None:
                height, width = target_sizes[index]
                boxes = boxes * boxes.new_tensor([width, height, width, height])
            location, label = (scores > threshold).nonzero(as_tuple=True)
            kept_scores, kept_boxes = scores[location, label], boxes[location]
            keep = _per_class_nms(kept_boxes, kept_scores, label, nms_threshold)
            keep = keep[kept_scores[keep].argsort(descending=True)][:max_detections]
            results.append({"scores": kept_scores[keep], "labels": label[keep], "boxes": kept_boxes[keep]})
        return results


def _focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * cross_entropy).sum()


def _register_checkpoint_layouts() -> None:
    """Heads of ace-lora-hf 0.1 kept the whole model under `ace_lora.`; their files keep that name on disk."""
    for head in ("AceLoraForSegmentation", "AceLoraForObjectDetection"):
        register_checkpoint_conversion_mapping(
            head, [WeightRenaming(r"^ace_lora\.vision_model\.", "vision_model.")], overwrite=True
        )


_register_checkpoint_layouts()


__all__ = ["AceLoraForObjectDetection", "AceLoraForSegmentation", "AceLoraObjectDetectionOutput", "box_area", "box_iou",
           "generalized_iou_loss", "non_maximum_suppression"]
