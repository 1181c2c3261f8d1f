"""`python -m ace_lora_hf.publishing.export_onnx`: onnxruntime reproduces PyTorch's ACE embeddings at any batch size."""

import importlib.util
import json
import shutil
import sys
import time

import numpy as np
import pytest
import torch

from ace_lora_hf import AceLoraModel
from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.errors import InvalidArgumentError, MissingDependencyError, ModelSourceError, OutputPathError
from ace_lora_hf.cli.export_onnx import main

from conftest import REPO_ROOT, SAMPLES, AceLoraModelTester, perturb_lora


TOLERANCE = 1e-4
DEFAULT_LABELS = ("No Finding", "pneumonia")  # ace-lora-classify's
SHIPPED_IMAGES = [*sorted(SAMPLES.iterdir()), *sorted((REPO_ROOT / "examples" / "images").glob("*.[pd][nc][gm]"))]
needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the onnx extra: pip install 'ace-lora-hf[onnx]'",
)


def onnx_embeddings(path, **inputs: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (embeddings,) = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
    return embeddings


def max_difference(onnx_output: np.ndarray, torch_output: torch.Tensor) -> float:
    assert onnx_output.shape == tuple(torch_output.shape)
    return float(np.abs(onnx_output - torch_output.numpy()).max())


def padded_texts(tester: AceLoraModelTester, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, tester.vocab_size, (batch_size, tester.text_context_length), generator=generator)
    input_ids[:, 0] = 2
    for row in range(batch_size):
        input_ids[row, 4 + 3 * row:] = 0
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


# ------------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_folder(tiny_hub_folder, tmp_path_factory):
    """A tiny model folder with a processor (every command loads a model folder's processor too)."""
    from transformers import AutoProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    perturb_lora(AceLoraModel(AceLoraModelTester().get_config())).save_pretrained(folder)
    AutoProcessor.from_pretrained(tiny_hub_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_export(tiny_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("tiny_onnx") / "onnx"
    main(["--model", str(tiny_folder), "--output", str(output), "--opset", "18"])
    return output


@needs_onnx
@pytest.mark.parametrize("batch_size", [1, 5])
def test_tiny_export_matches_pytorch_at_any_batch_size(tiny_folder, tiny_export, batch_size):
    tester = AceLoraModelTester()
    model = AceLoraModel.from_pretrained(tiny_folder).eval()  # LoRA unmerged: the export must have merged it
    pixel_values = torch.randn(batch_size, 3, tester.image_size, tester.image_size)
    texts = padded_texts(tester, batch_size, seed=batch_size)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values).pooler_output
        text_embeds = model.get_text_features(**texts).pooler_output
    assert max_difference(onnx_embeddings(tiny_export / "vision.onnx", pixel_values=pixel_values),
                          image_embeds) <= TOLERANCE
    assert max_difference(onnx_embeddings(tiny_export / "text.onnx", **texts), text_embeds) <= TOLERANCE


@needs_onnx
def test_the_description_says_how_to_feed_both_files(tiny_export):
    tester = AceLoraModelTester()
    description = json.loads((tiny_export / "export_onnx.json").read_text())
    vision, text = description["vision"], description["text"]
    assert vision["inputs"] == [{"name": "pixel_values", "dtype": "float32",
                                 "shape": ["batch", 3, tester.image_size, tester.image_size]}]
    assert [entry["name"] for entry in text["inputs"]] == ["input_ids", "attention_mask"]
    assert {entry["dtype"] for entry in text["inputs"]} == {"int64"}
    assert text["inputs"][0]["shape"] == ["batch", tester.text_context_length] == text["inputs"][1]["shape"]
    assert text["context_length"] == tester.text_context_length and text["pad_token_id"] == 0
    for entry, name in ((vision, "image_embeds"), (text, "text_embeds")):
        assert entry["outputs"] == [{"name": name, "dtype": "float32", "shape": ["batch", tester.projection_dim]}]
        assert entry["opset"] == 18 and entry["max_abs_difference"] <= TOLERANCE
    assert description["logit_scale"] == pytest.approx(1 / 0.07)
    assert sorted(path.name for path in tiny_export.iterdir()) == ["export_onnx.json", "text.onnx", "vision.onnx"]


@needs_onnx
def test_the_exported_graphs_hold_merged_weights_only(tiny_export):
    import onnx

    for name in ("vision.onnx", "text.onnx"):
        initializers = [tensor.name for tensor in onnx.load(tiny_export / name).graph.initializer]
        assert initializers and not [name for name in initializers if "lora" in name.lower()]


@needs_onnx
def test_outputs_are_checked_before_the_work(tiny_folder, tiny_export):
    before = {path.name: path.stat().st_mtime_ns for path in tiny_export.iterdir()}
    with pytest.raises(OutputPathError, match="is not empty; pass --overwrite"):
        main(["--model", str(tiny_folder), "--output", str(tiny_export)])
    with pytest.raises(OutputPathError, match="holds an input"):
        main(["--model", str(tiny_folder), "--output", str(tiny_folder), "--overwrite"])
    assert {path.name: path.stat().st_mtime_ns for path in tiny_export.iterdir()} == before


@needs_onnx
def test_overwriting_an_export_keeps_the_users_other_files(tiny_folder, tiny_export, tmp_path):
    export = shutil.copytree(tiny_export, tmp_path / "onnx")
    (export / "notes.txt").write_text("mine")
    main(["--model", str(tiny_folder), "--output", str(export), "--overwrite", "--opset", "18"])
    assert (export / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in export.iterdir()) == ["export_onnx.json", "notes.txt", "text.onnx",
                                                              "vision.onnx"]


@needs_onnx
def test_a_folder_without_both_towers_is_refused(tiny_folder, tmp_path):
    AceLoraModel.from_pretrained(tiny_folder).vision_model.save_pretrained(tmp_path / "vision_tower")
    with pytest.raises(ModelSourceError, match="a ace_lora_vision_model model, not ACE-LoRA"):
        main(["--model", str(tmp_path / "vision_tower"), "--output", str(tmp_path / "onnx")])
    with pytest.raises(ModelSourceError, match="no such folder"):
        main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "onnx")])
    assert not (tmp_path / "onnx").exists()


@needs_onnx
@pytest.mark.parametrize("opset", [0, 17, 999])
def test_an_opset_the_exporter_cannot_write_is_refused(tiny_folder, tmp_path, opset):
    with pytest.raises(InvalidArgumentError, match=f"--opset {opset}: torch.onnx exports opsets 18 to"):
        main(["--model", str(tiny_folder), "--output", str(tmp_path / "onnx"), "--opset", str(opset)])
    assert not (tmp_path / "onnx").exists()


def test_a_missing_package_is_one_line_naming_the_extra(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    argv = ["--model", str(tiny_folder), "--output", str(tmp_path / "onnx")]
    with pytest.raises(MissingDependencyError, match=r"needs .*onnxscript.* pip install 'ace-lora-hf\[onnx\]'"):
        main(argv)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "pip install 'ace-lora-hf[onnx]'" in stderr
    assert not (tmp_path / "onnx").exists()


# ------------------------------------------------------------------- full size: BiomedCLIP stand-in + ACE-LoRA


@pytest.fixture(scope="module")
def converted_export(converted_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("ace_lora_onnx") / "onnx"
    start = time.perf_counter()
    main(["--model", str(converted_dir), "--output", str(output), "--labels", *DEFAULT_LABELS])
    print(f"\nfull-size ONNX export (both files, with the check): {time.perf_counter() - start:.1f} s")
    return output


@needs_onnx
@pytest.mark.parametrize("batch_size", [4, 1])
def test_full_size_vision_export_matches_pytorch_and_the_reference(converted_export, ace_model, reference,
                                                                  batch_size):
    pixel_values = torch.from_numpy(reference["input_images"][:batch_size])
    with torch.no_grad():
        expected = ace_model.get_image_features(pixel_values).pooler_output
    exported = onnx_embeddings(converted_export / "vision.onnx", pixel_values=pixel_values)
    assert max_difference(exported, expected) <= TOLERANCE
    np.testing.assert_allclose(exported, reference["img_ace_emb"][:batch_size], rtol=0, atol=TOLERANCE)


@needs_onnx
@pytest.mark.parametrize("batch_size", [6, 1])
def test_full_size_text_export_matches_pytorch(converted_export, ace_model, reference, batch_size):
    input_ids = torch.from_numpy(reference["input_prompt_ids"]).flatten(0, 1)[:batch_size]
    texts = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}
    with torch.no_grad():
        expected = ace_model.get_text_features(**texts).pooler_output
    assert max_difference(onnx_embeddings(converted_export / "text.onnx", **texts), expected) <= TOLERANCE


@needs_onnx
def test_full_size_zero_shot_matches_pytorch_with_the_default_templates(converted_export, converted_dir, ace_model):
    from transformers import AutoProcessor

    from ace_lora_hf.inference.onnx_zero_shot import OnnxZeroShotClassifier
    from ace_lora_hf.models.ace_lora.image_loading import load_image
    from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier

    processor = AutoProcessor.from_pretrained(converted_dir)
    pixel_values = processor(images=[load_image(path) for path in SHIPPED_IMAGES], return_tensors="pt")["pixel_values"]
    expected = ZeroShotClassifier(ace_model, processor)(SHIPPED_IMAGES, DEFAULT_LABELS)
    exported = OnnxZeroShotClassifier(converted_export)(pixel_values)
    assert len(SHIPPED_IMAGES) == 8 and max_difference(exported.numpy(), expected) <= TOLERANCE
    assert (exported.argmax(-1) == expected.argmax(-1)).all()


@needs_onnx
def test_full_size_per_finding_zero_shot_matches_pytorch(converted_export, converted_dir, ace_model, tmp_path):
    """Prompt pairs (default and given negatives) stored beside the same vision.onnx."""
    from transformers import AutoProcessor

    from ace_lora_hf.inference.onnx_zero_shot import DESCRIPTION_FILE, ExportedClasses, OnnxZeroShotClassifier
    from ace_lora_hf.models.ace_lora.image_loading import load_image
    from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier
    from ace_lora_hf.publishing.export_onnx import save_class_embeddings

    processor = AutoProcessor.from_pretrained(converted_dir)
    pixel_values = processor(images=[load_image(path) for path in SHIPPED_IMAGES], return_tensors="pt")["pixel_values"]
    findings = ["pneumonia", "pneumothorax", "cardiomegaly", "pleural effusion"]
    for negative_templates in (None, ["there is no {}.", "the lung shows no {}."]):
        classifier = ZeroShotClassifier(ace_model, processor, negative_templates=negative_templates)
        export = shutil.copytree(converted_export, tmp_path / f"onnx_{negative_templates is None}")
        description = json.loads((export / DESCRIPTION_FILE).read_text())
        description["classes"] = save_class_embeddings(export, ExportedClasses.compute(classifier, findings, True))
        (export / DESCRIPTION_FILE).write_text(json.dumps(description))
        expected = classifier(SHIPPED_IMAGES, findings, multi_label=True)
        assert max_difference(OnnxZeroShotClassifier(export)(pixel_values).numpy(), expected) <= TOLERANCE
