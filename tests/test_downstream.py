"""Segmentation and detection heads on the frozen encoder: metrics by hand, heads, training, the scripts."""

import csv
import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForObjectDetection, AutoModelForSemanticSegmentation
from transformers.image_transforms import center_to_corners_format

from ace_lora_hf import AceLoraForObjectDetection, AceLoraForSegmentation, AceLoraImageProcessor, AceLoraModel
from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.training.finetuning import SEGMENTATION, boxes_in_crop, finetuning_parser
from ace_lora_hf.evaluation.metrics import detection_map, dice_metrics
from ace_lora_hf.models.ace_lora.modeling_ace_lora_heads import box_iou, generalized_iou_loss, non_maximum_suppression

from conftest import REPO_ROOT, AceLoraModelTester, perturb_lora


# ------------------------------------------------------------------------------------------------------ metrics


def test_dice_over_positive_images_and_pooled_by_hand():
    true = np.zeros((3, 4, 4), bool)
    predicted = np.zeros((3, 4, 4), bool)
    true[0, :2, :2] = True  # 4 pixels
    predicted[0, :2, :1] = True  # 2 pixels, both inside: Dice 2*2/(2+4) = 2/3
    true[1, 0, 0] = True  # 1 pixel, predicted nowhere: Dice 0
    predicted[2, 3, 3] = True  # a negative image with a false positive: no Dice of its own, counts in the pooled one
    metrics = dice_metrics(predicted, true)
    assert metrics["dice_positive"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["dice_pooled"] == pytest.approx(2 * 2 / (3 + 5))
    counts = ("num_images", "num_positive_images", "num_images_predicted_positive")
    assert [metrics[count] for count in counts] == [3, 2, 2]


def test_predicting_nothing_scores_zero_and_is_warned_about(caplog):
    """Issue #14: per-image Dice with empty-vs-empty = 1 gave 0.5 to a head that predicted no foreground at all."""
    true = np.zeros((4, 8, 8), bool)
    true[0, 2:5, 2:5] = True  # one positive image among mostly negative ones, as in SIIM
    with caplog.at_level("WARNING"):
        metrics = dice_metrics(np.zeros_like(true), true)
    assert metrics["dice_positive"] == 0.0 and metrics["dice_pooled"] == 0.0
    assert metrics["num_images_predicted_positive"] == 0 and "predicts nothing" in caplog.text


def test_dice_without_any_true_foreground_is_undefined():
    metrics = dice_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    assert np.isnan(metrics["dice_positive"]) and np.isnan(metrics["dice_pooled"])


def test_rsna_map_by_hand():
    truth = [[[0, 0, 10, 10]], [], [[0, 0, 10, 10], [20, 20, 30, 30]], []]
    predictions = [
        {"boxes": [[0, 0, 10, 6]], "scores": [0.9]},  # IoU 0.6: a hit for t < 0.6 (0.4..0.55: 4 of 8 thresholds)
        {"boxes": [[5, 5, 9, 9]], "scores": [0.3]},  # a false positive on an empty image: 0
        {"boxes": [[20, 20, 30, 30], [0, 0, 10, 10]], "scores": [0.8, 0.7]},  # both exact: 1
        {"boxes": [], "scores": []},  # nothing true, nothing predicted: left out
    ]
    result = detection_map(predictions, truth)
    assert result["num_images"] == 3
    # image 0: TP/(TP+FP+FN) = 1 for 4 thresholds, 0/(0+1+1) = 0 for the other 4 -> 0.5
    assert result["map"] == pytest.approx((0.5 + 0 + 1) / 3)


def test_box_iou_and_nms():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    assert box_iou(boxes[:1], boxes[1:2]).item() == pytest.approx(81 / 100)
    keep = non_maximum_suppression(boxes, torch.tensor([0.5, 0.9, 0.8]), iou_threshold=0.5)
    assert keep.tolist() == [1, 2]


def test_generalized_iou_loss_by_hand():
    predicted = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2]])
    target = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2]])
    # pair 0: intersection 1, union 7, enclosing box 9 -> 1 - 1/7 + (9 - 7)/9; pair 1: identical boxes -> 0
    assert generalized_iou_loss(predicted, target).item() == pytest.approx((1 - 1 / 7 + 2 / 9) / 2)


# -------------------------------------------------------------------------------------------------------- heads


@pytest.fixture
def head_config():
    return AceLoraModelTester(image_size=32, patch_size=8).get_config(head_hidden_size=16, num_labels=1)


def _bright_square_batch(generator, batch=4, size=32):
    pixels = torch.randn(batch, 3, size, size, generator=generator) * 0.1
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    boxes = []
    for index in range(batch):
        top, left = (int(v) for v in torch.randint(0, size - 12, (2,), generator=generator))
        pixels[index, :, top : top + 12, left : left + 12] += 2.0
        masks[index, top : top + 12, left : left + 12] = 1
        boxes.append({"class_labels": torch.tensor([0]),
                      "boxes": torch.tensor([[(left + 6) / size, (top + 6) / size, 12 / size, 12 / size]])})
    return pixels, masks, boxes


def test_only_the_head_trains_and_the_encoder_stays_frozen(head_config):
    model = AceLoraForSegmentation(head_config)
    pixels, masks, _ = _bright_square_batch(torch.Generator().manual_seed(0))
    model(pixel_values=pixels, labels=masks).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (not name.startswith("vision_model."))
        assert (parameter.grad is not None) == parameter.requires_grad, name


@pytest.mark.parametrize("head", [AceLoraForSegmentation, AceLoraForObjectDetection])
def test_head_training_lowers_the_loss(head, head_config):
    torch.manual_seed(0)
    model = head(head_config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    batches = [_bright_square_batch(generator) for _ in range(4)]
    losses = []
    for epoch in range(8):
        for pixels, masks, boxes in batches:
            loss = model(pixel_values=pixels, labels=masks if head is AceLoraForSegmentation else boxes).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


@pytest.mark.parametrize(("head", "auto"), [(AceLoraForSegmentation, AutoModelForSemanticSegmentation),
                                            (AceLoraForObjectDetection, AutoModelForObjectDetection)])
def test_heads_round_trip_and_start_from_an_ace_lora_folder(head, auto, head_config, tmp_path):
    torch.manual_seed(0)
    base = perturb_lora(AceLoraModel(head_config))
    base.save_pretrained(tmp_path / "base")
    model = head.from_pretrained(tmp_path / "base").eval()
    encoder = model.vision_model.state_dict()
    for key, value in base.vision_model.state_dict().items():
        if not key.startswith(("projection.", "hypergraph.")):
            torch.testing.assert_close(encoder[key], value, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert auto.__name__ in config["auto_map"]
    reloaded = auto.from_pretrained(tmp_path / "head").eval()
    assert type(reloaded) is head
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, actual = model(pixel_values=pixels), reloaded(pixel_values=pixels)
    torch.testing.assert_close(actual.logits, expected.logits)


def test_detection_post_processing(head_config):
    model = AceLoraForObjectDetection(head_config).eval()
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(2, 3, 32, 32))
    results = model.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(64, 48), (32, 32)])
    for result, (height, width) in zip(results, [(64, 48), (32, 32)]):
        assert result["boxes"].shape[1] == 4 and len(result["scores"]) == len(result["labels"]) <= 100
        assert (result["boxes"][:, 2] <= width).all() and (result["boxes"][:, 3] <= height).all()
        assert torch.equal(result["scores"], result["scores"].sort(descending=True).values)
        kept_iou = box_iou(result["boxes"], result["boxes"]).fill_diagonal_(0)
        assert (kept_iou <= 0.5 + 1e-6).all()  # after non-maximum suppression


# ---------------------------------------------------------------------------------------------- boxes in the crop


@pytest.mark.parametrize("size", [(300, 500), (500, 300), (257, 256)])
def test_boxes_land_where_the_processor_puts_their_pixels(size):
    """A bright box drawn on an image lies, after the processor's resize and crop, where `boxes_in_crop` puts it."""
    height, width = size
    processor = AceLoraImageProcessor()  # BiomedCLIP's: shortest edge 224, center crop 224
    box = [width * 0.3, height * 0.35, width * 0.6, height * 0.7]
    pixels = np.zeros((height, width), np.uint8)
    pixels[round(box[1]):round(box[3]), round(box[0]):round(box[2])] = 255
    processed = processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0, 0]
    rows, columns = torch.nonzero(processed > processed.min() + 1, as_tuple=True)
    found = torch.tensor([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], dtype=torch.float32)
    mapped = center_to_corners_format(boxes_in_crop([box], processor, height, width))[0] * 224
    torch.testing.assert_close(mapped, found, rtol=0, atol=2.0)  # bicubic resampling blurs edges by a pixel


def test_boxes_outside_the_crop_are_cut_or_dropped():
    processor = AceLoraImageProcessor()
    # 224 x 448: resized as it is, the crop keeps columns 112..336
    inside, straddling, outside = [150, 10, 200, 60], [100, 10, 200, 60], [0, 0, 50, 50]
    boxes = center_to_corners_format(boxes_in_crop([inside, straddling, outside], processor, 224, 448)) * 224
    torch.testing.assert_close(boxes, torch.tensor([[38.0, 10, 88, 60], [0, 10, 88, 60]]))


# ------------------------------------------------------------------------------------------------------ scripts


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = {task: _load_script(f"finetune_{task}") for task in ("segmentation", "detection")}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def finetune(task, *argv):
    """examples/finetune_TASK.py in this process, as `python examples/finetune_TASK.py ARGV` runs it."""
    try:
        SCRIPTS[task].main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def downstream_data(tmp_path_factory):
    """SIIM-like segmentation and RSNA-like detection tables over the same synthetic images; a third are negative."""
    root = tmp_path_factory.mktemp("downstream")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    segmentation, detection = [], []
    for index in range(24):
        pixels = rng.integers(0, 60, (48, 48), dtype=np.uint8)
        mask = np.zeros((48, 48), np.uint8)
        boxes = []
        if index % 3:
            top, left = rng.integers(0, 30, 2)
            pixels[top : top + 16, left : left + 16] += 180
            mask[top : top + 16, left : left + 16] = 255
            boxes = [[float(left), float(top), float(left + 16), float(top + 16)]]
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")
        split = "train" if index < 16 else ("valid" if index < 20 else "test")
        segmentation.append({"Path": f"images/{index}.png", "Mask": f"masks/{index}.png", "split": split})
        detection.append({"Path": f"images/{index}.png", "boxes": json.dumps(boxes), "split": split})
    for name, rows in (("siim_segmentation.csv", segmentation), ("rsna_detection.csv", detection)):
        with (root / name).open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


COMMON = ("--batch_size", 4, "--num_workers", 0)
SCRIPT_TABLES = {"segmentation": "siim_segmentation.csv", "detection": "rsna_detection.csv"}


@pytest.mark.parametrize(("task", "metric"), [("segmentation", "dice_positive"), ("detection", "map")])
def test_finetune_scripts_end_to_end(task, metric, tiny_hub_folder, downstream_data, tmp_path):
    run = tmp_path / "run"
    finetune(task, "--model", tiny_hub_folder, "--data_root", downstream_data, "--output_dir", run, "--num_epochs", 2,
             "--fraction", 0.5, "--learning_rate", "3e-3", *COMMON)
    history = json.loads((run / "training_history.json").read_text())
    assert len(history) == 2 and all(f"valid_{metric}" in epoch for epoch in history)
    results = json.loads((run / "test_results.json").read_text())
    assert (results["task"], results["split"], results["fraction"]) == (task, "test", 0.5)
    assert 0.0 <= results["metrics"][metric] <= 1.0
    # The epoch with the best validation metric is best/, and it holds only the head's weights.
    record = json.loads((run / "best" / "ace_lora_checkpoint.json").read_text())
    assert record["epoch"] == max(range(2), key=lambda epoch: (history[epoch][f"valid_{metric}"], -epoch))
    weights = load_file(run / "best" / "trainable.safetensors")
    assert weights and not any(name.startswith("vision_model.") for name in weights)
    assert not (run / "best" / "model.safetensors").exists() and (run / "final" / "model.safetensors").is_file()


def test_evaluate_only_reproduces_the_test_metrics_from_the_light_best(tiny_hub_folder, downstream_data, tmp_path):
    run = tmp_path / "run"
    finetune("segmentation", "--model", tiny_hub_folder, "--data_root", downstream_data, "--output_dir", run,
             "--num_epochs", 1, *COMMON)
    expected = json.loads((run / "test_results.json").read_text())["metrics"]
    finetune("segmentation", "--model", run / "best", "--data_root", downstream_data, "--output_dir", run,
             "--evaluate_only", *COMMON)
    assert json.loads((run / "test_results.json").read_text())["metrics"] == pytest.approx(expected)


def test_a_stopped_fine_tune_resumes_to_the_same_head(tiny_hub_folder, downstream_data, tmp_path):
    common = ("--model", tiny_hub_folder, "--data_root", downstream_data, "--num_epochs", 2, "--checkpointing_steps", 1,
              "--learning_rate", "3e-3", *COMMON)
    finetune("detection", *common, "--output_dir", tmp_path / "straight")
    finetune("detection", *common, "--output_dir", tmp_path / "stopped", "--max_train_steps", 3)
    finetune("detection", *common, "--output_dir", tmp_path / "stopped", "--resume_from_checkpoint", "latest")
    expected, actual = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "stopped"))
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert [json.loads((tmp_path / run / "test_results.json").read_text()) for run in ("straight", "stopped")] == [
        json.loads((tmp_path / "straight" / "test_results.json").read_text())] * 2


def test_save_full_best_makes_a_loadable_head_folder(tiny_hub_folder, downstream_data, tmp_path):
    run = tmp_path / "run"
    finetune("detection", "--model", tiny_hub_folder, "--data_root", downstream_data, "--output_dir", run,
             "--num_epochs", 1, "--save_full_best", *COMMON)
    model = AutoModelForObjectDetection.from_pretrained(run / "best")
    final = AutoModelForObjectDetection.from_pretrained(run / "final")
    assert type(model) is AceLoraForObjectDetection and model.config.num_labels == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final.state_dict().values()))


def test_finetune_options_take_the_dash_spelling_and_help_lists_each_once(capsys):
    required = ["--model", "m", "--data_root", "d", "--output_dir", "o"]
    underscores = finetuning_parser(SEGMENTATION, None).parse([*required, "--mask_root", "masks", "--max_train_steps",
                                                               "4", "--evaluate_only"])
    dashes = finetuning_parser(SEGMENTATION, None).parse([*required, "--mask-root", "masks", "--max-train-steps", "4",
                                                          "--evaluate-only"])
    assert vars(dashes) == vars(underscores) and (dashes.max_train_steps, dashes.evaluate_only) == (4, True)
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS["segmentation"].main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and help_text.count("--mask_root MASK_ROOT") == 2  # usage and the option's own
    assert re.findall(r"--\w+-[\w-]+", help_text) == ["--output-dir"]  # the epilog's example of the dash spelling


@pytest.mark.parametrize(("task", "column", "value", "message"), [
    ("detection", "boxes", "abc", r"line 2: column 'boxes' is 'abc'; expected a JSON list of \[x1, y1, x2, y2\]"),
    ("detection", "boxes", "[[10, 10, 5, 20]]", "line 2: column 'boxes' is '\\[\\[10, 10, 5, 20\\]\\]'"),
    ("segmentation", "Mask", "masks/gone.png", r"line 2: file .*gone.png \(column 'Mask'\) not found"),
])
def test_bad_downstream_table_is_one_line_before_the_model_loads(task, column, value, message, downstream_data,
                                                                 tmp_path, capsys):
    table = tmp_path / "table.csv"
    with (downstream_data / SCRIPT_TABLES[task]).open(newline="") as file:
        rows = list(csv.DictReader(file))
    rows[0][column] = value
    with table.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    argv = ["--model", tmp_path / "no_model", "--data_root", downstream_data, "--table", table, "--output_dir",
            tmp_path / "run", *(["--mask_root", downstream_data] if task == "segmentation" else [])]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(SCRIPTS[task].main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and len(err.strip().splitlines()) == 1
    assert str(table) in err and re.search(message, err), err


def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(downstream_data, tmp_path):
    from ace_lora_hf.errors import ImageLoadError
    from ace_lora_hf.training.finetuning import SegmentationSet

    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "short.png")
    rows = [{"Path": "images/1.png", "Mask": "short.png"}]
    processor = AceLoraImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    dataset = SegmentationSet(rows, downstream_data, tmp_path, processor)
    with pytest.raises(ImageLoadError, match=r"short.png: the mask is 48x40 pixels but its image images/1.png is "
                                             r"48x48: write the mask at the image's size"):
        dataset[0]
