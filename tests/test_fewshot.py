"""ace-lora-fewshot: the results table's shape, shots and scores reproducible from the seed, the linear probe on a
separable set, the prompt head's start equal to zero-shot with the model's adapters restored, bad tables refused; a
prepared set scoring and drawing as the table of its images, rows without a single class left out, its mistakes
refused in one line."""

import csv
import json
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from ace_lora_hf.cli import fewshot as fewshot_cli
from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.data.prepared import PreparedImages
from ace_lora_hf.evaluation.metrics import classification_metrics
from ace_lora_hf.fewshot.embeddings import encode
from ace_lora_hf.fewshot.linear_probe import C_GRID, DEFAULT_C, fit_linear_probe
from ace_lora_hf.fewshot.prepared_sets import read_prepared_set
from ace_lora_hf.fewshot.prompt_classifier import HeadTraining, lora_parameters, train_and_score
from ace_lora_hf.fewshot.report import SUMMARY_COLUMNS
from ace_lora_hf.fewshot.sampling import draw_shots, read_labelled_table
from ace_lora_hf.models.ace_lora.zero_shot import ZeroShotClassifier
from dataset_prep.__main__ import main as prepare_main

from test_training import write_csv


CLASSES = ("normal", "pneumonia")  # words of the test vocabulary


def write_toy_table(folder, name: str, per_class: int, seed: int):
    """Dark images are 'normal', bright ones 'pneumonia' (noise on top): a set a linear probe separates."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, level in zip(CLASSES, (40, 210)):
        for index in range(per_class):
            pixels = np.clip(level + rng.normal(0, 12, (40, 40)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{label}_{index}.png")
            rows.append({"Path": f"{name}_{label}_{index}.png", "Label": label})
    table = folder / f"{name}.csv"
    with open(table, "w", newline="") as file:
        writer = csv.DictWriter(file, ["Path", "Label"])
        writer.writeheader()
        writer.writerows(rows)
    return table


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fewshot_data")
    return write_toy_table(folder, "train", 4, seed=0), write_toy_table(folder, "test", 5, seed=1)


def run_fewshot(tiny_hub_folder, tables, output, *extra: str):
    train, test = tables
    fewshot_cli.main(["--train-table", str(train), "--test-table", str(test), "--model", str(tiny_hub_folder),
                      "--shots", "1", "2", "--seeds", "0", "1", "--steps", "3", "--device", "cpu",
                      "--num-workers", "0", "--output", str(output), *extra])
    with open(output / "results.csv", newline="") as file:
        summary = list(csv.DictReader(file))
    with open(output / "shots.csv", newline="") as file:
        shots = list(csv.DictReader(file))
    return summary, json.loads((output / "results.json").read_text()), shots, output


@pytest.fixture(scope="module")
def two_runs(tiny_hub_folder, tables, tmp_path_factory):
    return [run_fewshot(tiny_hub_folder, tables, tmp_path_factory.mktemp("fewshot") / "out") for _ in range(2)]


def test_results_table_has_a_row_per_method_and_k(two_runs):
    summary, report, _, output = two_runs[0]
    assert list(summary[0]) == list(SUMMARY_COLUMNS)
    assert [(row["method"], row["shots"], row["runs"]) for row in summary] == [
        ("zero-shot", "0", "1"), ("linear-probe", "1", "2"), ("prompt-head", "1", "2"),
        ("linear-probe", "2", "2"), ("prompt-head", "2", "2")]
    assert len(report["runs"]) == 1 + 2 * 2 * 2 and report["classes"] == list(CLASSES)
    for row in report["summary"][1:]:
        runs = [run for run in report["runs"] if run["method"] == row["method"] and run["shots"] == row["shots"]]
        accuracies = [run["accuracy"] for run in runs]
        assert row["accuracy_mean"] == pytest.approx(np.mean(accuracies))
        assert row["accuracy_std"] == pytest.approx(np.std(accuracies))
    assert {row["C"] for row in summary if row["method"] == "linear-probe"} == {f"{DEFAULT_C:g}"}  # < 4 shots
    with Image.open(output / "results.png") as picture:
        assert picture.format == "PNG"


def test_zero_shot_row_scores_as_the_zero_shot_classifier(two_runs, tiny_hub_folder, tables):
    model, processor = AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)
    test = read_labelled_table(tables[1], "Path", "Label", None, CLASSES, "--test-table")
    expected = classification_metrics(ZeroShotClassifier(model, processor, num_workers=0)(test.images, CLASSES),
                                      test.targets)
    zero_shot = two_runs[0][1]["runs"][0]
    assert zero_shot["method"] == "zero-shot" and zero_shot["seed"] is None
    assert zero_shot["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-5)
    assert zero_shot["auc"] == pytest.approx(expected["auc"], abs=1e-5)


def test_same_seed_gives_the_same_shots_and_scores(two_runs):
    (summary, report, shots, _), (summary_again, report_again, shots_again, _) = two_runs
    assert shots == shots_again and summary == summary_again
    assert report["runs"] == report_again["runs"]
    by_seed = {}
    for row in shots:
        by_seed.setdefault((row["seed"], row["shots"]), []).append(row["image"])
    assert len(shots) == 2 * (1 * 2 + 2 * 2)
    for seed in ("0", "1"):
        assert set(by_seed[seed, "1"]) < set(by_seed[seed, "2"])  # nested as K grows
    assert by_seed["0", "2"] != by_seed["1", "2"] or by_seed["0", "1"] != by_seed["1", "1"]


def test_linear_probe_separates_the_toy_set(two_runs):
    report = two_runs[0][1]
    assert [run["accuracy"] for run in report["runs"] if run["method"] == "linear-probe"] == [1.0] * 4


def test_linear_probe_chooses_c_by_cross_validation_from_four_shots():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(-1, 0.3, (8, 5)), rng.normal(1, 0.3, (8, 5))])
    targets = np.repeat([0, 1], 8)
    probe, C = fit_linear_probe(features, targets, seed=0)
    assert C in C_GRID and probe.C == C
    assert (probe.predict(features) == targets).all()
    assert fit_linear_probe(features[[0, 1, 8, 9]], targets[[0, 1, 8, 9]], seed=0)[1] == DEFAULT_C


def test_prompt_head_starts_as_zero_shot_and_restores_the_adapters(tiny_hub_folder, tables):
    model, processor = AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)
    pool = read_labelled_table(tables[0], "Path", "Label", None, None, "--train-table")
    test = read_labelled_table(tables[1], "Path", "Label", None, pool.classes, "--test-table")
    classifier = ZeroShotClassifier(model, processor, num_workers=0)
    classes = classifier.class_embeddings(pool.classes)
    shots = pool.subset(draw_shots(pool, seed=0, shots=2))
    before = {name: parameter.detach().clone() for name, parameter in lora_parameters(model).items()}
    flags = [parameter.requires_grad for parameter in model.parameters()]
    untrained = train_and_score(model, processor.image_processor, classes, shots, test, seed=0,
                                training=HeadTraining(steps=0), num_workers=0)
    torch.testing.assert_close(torch.from_numpy(untrained).float(), classifier(test.images, pool.classes),
                               rtol=0, atol=1e-5)
    trained = train_and_score(model, processor.image_processor, classes, shots, test, seed=0,
                              training=HeadTraining(steps=3), num_workers=0)
    assert not np.allclose(trained, untrained)
    for name, parameter in lora_parameters(model).items():
        torch.testing.assert_close(parameter, before[name], rtol=0, atol=0)
    assert [parameter.requires_grad for parameter in model.parameters()] == flags and not model.training


def test_a_class_with_fewer_images_than_k_is_named(tables, tmp_path, capsys):
    train, test = tables
    argv = ["--train-table", str(train), "--test-table", str(test), "--shots", "2", "5",
            "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fewshot_cli.main, argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert error.endswith(f"error: {train}: class 'normal' has 4 image(s), fewer than --shots 5; add images of that "
                          "class or ask for fewer shots.")
    assert "\n" not in error and not (tmp_path / "o").exists()


def test_a_test_label_outside_the_classes_is_named(tables, tmp_path, capsys):
    train, _ = tables
    test = tmp_path / "test.csv"
    test.write_text(f"Path,Label\n{train.parent / 'train_normal_0.png'},edema\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fewshot_cli.main, ["--train-table", str(train), "--test-table", str(test), "--shots", "1",
                                   "--output", str(tmp_path / "o")])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip().endswith(
        f"{test}, line 2: column 'Label' is 'edema', not one of the classes ['normal', 'pneumonia'] (--labels).")


def test_the_commands_method_names_are_the_runners():
    from ace_lora_hf.fewshot.runner import METHODS

    assert fewshot_cli.METHODS == METHODS


def test_shares_of_the_table_with_the_probes_c_by_cross_validation(tiny_hub_folder, tables, tmp_path):
    train, test = tables
    fewshot_cli.main(["--train-table", str(train), "--test-table", str(test), "--model", str(tiny_hub_folder),
                      "--train-fraction", "0.5", "1.0", "--seeds", "3", "--methods", "zero-shot", "linear-probe",
                      "--device", "cpu", "--num-workers", "0", "--output", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(row["method"], row["shots"], row["fraction"]) for row in report["summary"]] == [
        ("zero-shot", 0, None), ("linear-probe", None, 0.5), ("linear-probe", None, 1.0)]
    with open(tmp_path / "out" / "shots.csv", newline="") as file:
        shots = list(csv.DictReader(file))
    assert [sum(row["fraction"] == share for row in shots) for share in ("0.5", "1.0")] == [2 * 2, 2 * 4]
    assert float(report["summary"][2]["C"]) in C_GRID and report["summary"][1]["C"] == f"{DEFAULT_C:g}"


def test_an_unreadable_image_and_a_class_without_images_are_named(tables, tiny_hub_folder, tmp_path, capsys):
    train, test = tables
    broken = tmp_path / "broken.csv"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [f"{train.parent / f'train_{label}_{i}.png'},{label}" for label in CLASSES for i in range(2)]
    broken.write_text("Path,Label\n" + "\n".join([*rows, f"{tmp_path / 'bad.png'},normal"]) + "\n")
    argv = ["--train-table", str(broken), "--test-table", str(test), "--model", str(tiny_hub_folder),
            "--methods", "linear-probe", "--device", "cpu", "--num-workers", "0"]
    with pytest.raises(SystemExit) as exit_info:  # every image of the table is a shot
        run_cli(fewshot_cli.main, [*argv, "--train-fraction", "1.0", "--output", str(tmp_path / "o")])
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]  # after loading's bars
    assert exit_info.value.code == EXIT_USER_ERROR and len(errors) == 1
    error = errors[0]
    assert f"{tmp_path / 'bad.png'}: " in error and error.endswith("; remove it from its table or replace the file")
    with pytest.raises(SystemExit):
        run_cli(fewshot_cli.main, [*argv, "--shots", "1", "--labels", "normal", "pneumonia", "edema",
                                   "--output", str(tmp_path / "p")])
    assert capsys.readouterr().err.strip().endswith(f"{broken}: class 'edema' has no image; add images of that class "
                                                    "or leave it out of --labels.")


# ------------------------------------------------------------------------------------------------ prepared sets

def one_hot_table(table, extra_rows=()):
    """`table` as ace-lora-prepare reads it: the same images, a report, and a 0/1 column per class."""
    with open(table, newline="") as file:
        rows = [{"Path": row["Path"], "report": "chest radiograph", **{name: int(row["Label"] == name)
                                                                        for name in CLASSES}}
                for row in csv.DictReader(file)]
    one_hot = table.with_name(f"{table.stem}_one_hot.csv")
    write_csv(one_hot, [*rows, *extra_rows])
    return one_hot


def prepare_set(table, output, *extra):
    prepare_main(["training-set", "--input", str(table), "--image-column", "Path", "--text-column", "report",
                  "--label-columns", *CLASSES, "--output", str(output), *map(str, extra)])
    return output


@pytest.fixture(scope="module")
def prepared_sets(tables, tiny_hub_folder, tmp_path_factory):
    """The toy tables' images as prepared sets (split train), sized by the tiny model's processor."""
    folder = tmp_path_factory.mktemp("prepared")
    return tuple(prepare_set(one_hot_table(table), folder / table.stem, "--model", tiny_hub_folder)
                 for table in tables)


def test_a_prepared_set_gives_the_tables_numbers_and_shots(two_runs, prepared_sets, tiny_hub_folder, tmp_path,
                                                           capsys):
    summary, report, shots, _ = two_runs[0]  # K = 1, 2; seeds 0, 1; every method
    capsys.readouterr()
    summary_prepared, report_prepared, shots_prepared, _ = run_fewshot(tiny_hub_folder, prepared_sets,
                                                                       tmp_path / "out", "--test-split", "train")
    printed = capsys.readouterr().out
    assert f"--train-table {prepared_sets[0]}, split train: 8 rows with one class\n" in printed
    assert f"--test-table {prepared_sets[1]}, split train: 10 rows with one class\n" in printed
    assert report_prepared["runs"] == report["runs"] and summary_prepared == summary
    assert len(report["runs"]) == 9 and {run["method"] for run in report["runs"]} == {
        "zero-shot", "linear-probe", "prompt-head"}
    drawn = [[(row["shots"], row["seed"], row["label"], row["line"]) for row in rows]
             for rows in (shots, shots_prepared)]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 12
    assert [row["image"] for row in shots_prepared][:2] == [f"train[{int(row['line']) - 2}]" for row in shots[:2]]
    assert (report_prepared["train_split"], report_prepared["test_split"]) == ("train", "train")


def test_prepared_images_stay_unread_until_used_and_reach_loader_workers(prepared_sets, tiny_hub_folder, tables):
    pool, left_out = read_prepared_set(prepared_sets[0], "train", None, "--train-table", "--train-split")
    assert left_out.total == 0 and pool.classes == CLASSES and pool.names[:2] == ["train[0]", "train[1]"]
    shots = pool.subset([7, 0])
    assert isinstance(shots.images, PreparedImages) and shots.images.split is pool.images.split  # rows, not bytes
    assert shots.names == ["train[7]", "train[0]"] and shots.lines == [9, 2]
    assert shots.images.split.column_names == ["Path"] and shots.images.split.cache_files  # one column, on disk
    assert pickle.loads(pickle.dumps(shots.images))[0] == shots.images[0] == pool.images[7]
    model, processor = AutoModel.from_pretrained(tiny_hub_folder).eval(), AutoProcessor.from_pretrained(tiny_hub_folder)
    from_table = read_labelled_table(tables[0], "Path", "Label", None, CLASSES, "--train-table")
    in_workers = encode(model, processor.image_processor, pool, batch_size=3, num_workers=2)
    torch.testing.assert_close(in_workers, encode(model, processor.image_processor, from_table, batch_size=3,
                                                  num_workers=0), rtol=0, atol=0)


def test_rows_without_a_single_class_are_left_out_and_counted(tables, tiny_hub_folder, tmp_path, capsys):
    """Rows with no class at 1 (0, -1 or empty) or with two; one folder, split by --validation-fraction, as the
    training and the test set (train and validation by default)."""
    extra = []
    for index, (normal, pneumonia) in enumerate([(0, 0), (-1, ""), ("", ""), (1, 1), (1, 1)]):
        Image.fromarray(np.full((40, 40), 30 * index, dtype=np.uint8)).save(tmp_path / f"extra_{index}.png")
        extra.append({"Path": str(tmp_path / f"extra_{index}.png"), "report": "chest radiograph", "normal": normal,
                      "pneumonia": pneumonia})
    train_table = one_hot_table(tables[0], extra)  # lines 2-9 the toy rows, 10-14 the extra ones
    folder = prepare_set(train_table, tmp_path / "set", "--model", tiny_hub_folder, "--validation-fraction", 0.5,
                         "--seed", 2)
    splits = {name: split["line"] for name, split in datasets.load_from_disk(str(folder)).items()}
    expected = {name: (sum(10 <= line <= 12 for line in lines), sum(line >= 13 for line in lines))
                for name, lines in splits.items()}
    assert all(expected[name] != (0, 0) for name in ("train", "validation"))  # the seed leaves some out of each
    fewshot_cli.main(["--train-table", str(folder), "--test-table", str(folder), "--model", str(tiny_hub_folder),
                      "--shots", "1", "--seeds", "0", "--methods", "zero-shot", "linear-probe", "--device", "cpu",
                      "--num-workers", "0", "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    for name, option in (("train", "--train-table"), ("validation", "--test-table")):
        kept = sum(line <= 9 for line in splits[name])
        none, several = expected[name]
        assert (f"{option} {folder}, split {name}: {kept} rows with one class; left out {none} with none of "
                f"['normal', 'pneumonia'] at 1 and {several} with several\n") in printed
    assert (f"warning: {folder} (split train) and {folder} (split validation) come from one table "
            "(train_one_hot.csv) split by row, not by patient") in printed
    assert f"{sum(line <= 9 for line in splits['train'])} training images, " \
           f"{sum(line <= 9 for line in splits['validation'])} test images" in printed
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (report["train_split"], report["test_split"]) == ("train", "validation")
    with open(tmp_path / "out" / "shots.csv", newline="") as file:
        assert all(int(row["line"]) <= 9 for row in csv.DictReader(file))


def refused(argv, capsys) -> str:
    """The one error line of a refused run (exit code EXIT_USER_ERROR)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fewshot_cli.main, [*map(str, argv), "--device", "cpu", "--num-workers", "0"])
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert exit_info.value.code == EXIT_USER_ERROR and len(errors) == 1
    return errors[0].split(": error: ", 1)[1]


def test_prepared_set_mistakes_are_refused_in_one_line(prepared_sets, tables, tiny_hub_folder, tmp_path, capsys):
    train, test = prepared_sets
    base = ["--model", tiny_hub_folder, "--shots", "1", "--output", tmp_path / "o"]
    cases = [
        (["--train-table", train, "--test-table", test],
         f"--test-table {test}: no split 'validation' (it has train); choose one with --test-split."),
        (["--train-table", train, "--test-table", test, "--train-split", "validation", "--test-split", "train"],
         f"--train-table {train}: no split 'validation' (it has train); choose one with --train-split."),
        (["--train-table", train, "--test-table", train, "--test-split", "train"],
         f"--train-table and --test-table are both split 'train' of {train}: the test images would be among the "
         "shots; choose another split with --test-split or --train-split."),
        (["--train-table", train, "--test-table", test, "--test-split", "train", "--labels", "normal", "edema"],
         f"--train-table {train}: no label column 'edema' (it has normal, pneumonia); choose classes among them with "
         "--labels."),
        (["--train-table", train, "--test-table", test, "--test-split", "train", "--label-column", "Label"],
         "--label-column Label: a prepared set has one 0/1 column per class; choose classes with --labels."),
        (["--train-table", train, "--test-table", test, "--test-split", "train", "--shots", "5"],
         f"{train} (split train): class 'normal' has 4 image(s), fewer than --shots 5; add images of that class or "
         "ask for fewer shots."),
        (["--train-table", train, "--test-table", test, "--test-split", "train", "--image-root", tmp_path],
         f"--image-root {tmp_path}: a prepared set holds its images; --image-root applies to the image paths of a CSV "
         "or JSON Lines table."),
        (["--train-table", train, "--test-table", test, "--test-split", "train", "--labels", "pneumonia"],
         f"--train-table {train}: one class ('pneumonia'); few-shot classification needs two or more."),
        (["--train-table", tables[0], "--test-table", test, "--train-split", "train"],
         f"--train-split train: {tables[0]} is a table, which has no splits; --train-split chooses a split of a "
         "prepared set."),
        (["--train-table", tables[0].parent, "--test-table", test],
         f"--train-table {tables[0].parent}: a folder without ace_lora_prepared.json; give a CSV or JSON Lines table "
         "or a set that ace-lora-prepare training-set wrote."),
    ]
    for argv, message in cases:
        assert refused([*base, *argv], capsys) == message
    assert not (tmp_path / "o").exists()


def test_a_split_without_any_single_class_row_is_refused(tables, tiny_hub_folder, tmp_path, capsys):
    with open(tables[0], newline="") as file:
        rows = [{"Path": row["Path"], "report": "chest radiograph", "normal": 1, "pneumonia": 1}
                for row in csv.DictReader(file)]
    both = tables[0].with_name("both_classes.csv")
    write_csv(both, rows)
    folder = prepare_set(both, tmp_path / "both", "--model", tiny_hub_folder)
    error = refused(["--train-table", folder, "--test-table", tables[1], "--shots", 1, "--model", tiny_hub_folder,
                     "--output", tmp_path / "o"], capsys)
    assert error == (f"--train-table {folder}, split train: no row has exactly one of ['normal', 'pneumonia'] at 1; "
                     "choose classes that its rows hold with --labels.")


def test_test_images_among_the_training_images_are_refused(tables, prepared_sets, tiny_hub_folder, tmp_path, capsys):
    """The same table prepared twice: its train split in one folder cannot be scored against the other's."""
    again = prepare_set(one_hot_table(tables[0]), tmp_path / "again", "--model", tiny_hub_folder)
    error = refused(["--train-table", prepared_sets[0], "--test-table", again, "--test-split", "train", "--shots", 1,
                     "--model", tiny_hub_folder, "--output", tmp_path / "o"], capsys)
    assert error == (f"{again} (split train): 8 of its images are also in {prepared_sets[0]} (split train) (lines 2, 3, "
                     "4, 5, 6, ... of train_one_hot.csv); score on images the shots cannot come from: another split or "
                     "set.")


def test_a_repeated_label_or_a_class_missing_from_the_test_table_is_refused(tables, tiny_hub_folder, tmp_path,
                                                                            capsys):
    train, test = tables
    with pytest.raises(SystemExit) as exit_info:
        fewshot_cli.parse_args(["--train-table", str(train), "--test-table", str(test), "--model", "m", "--output",
                                "o", "--labels", "normal", "pneumonia", "normal"])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "--labels: 'normal' is given twice; name each class once." in capsys.readouterr().err
    with open(test, newline="") as file:
        normal_only = [row for row in csv.DictReader(file) if row["Label"] == "normal"]
    write_csv(test.with_name("normal_only.csv"), normal_only)
    error = refused(["--train-table", train, "--test-table", test.with_name("normal_only.csv"), "--shots", 1,
                     "--model", tiny_hub_folder, "--output", tmp_path / "o"], capsys)
    assert error == (f"{test.with_name('normal_only.csv')}: class 'pneumonia' has no image; add images of that class "
                     "or leave it out of --labels.")


def test_a_set_prepared_for_another_image_size_is_refused_once_the_model_is_known(tables, prepared_sets,
                                                                                 tiny_hub_folder, tmp_path, capsys):
    other = prepare_set(one_hot_table(tables[0]), tmp_path / "set224")  # BiomedCLIP's 224 x 224, not the tiny 32
    error = refused(["--train-table", other, "--test-table", prepared_sets[1], "--test-split", "train", "--shots", 1,
                     "--model", tiny_hub_folder, "--output", tmp_path / "o"], capsys)
    assert error.startswith(f"--train-table {other}: prepared with image processor settings ") and error.endswith(
        f"which are not --model {tiny_hub_folder}'s; prepare it again with --model (ace-lora-prepare training-set).")
    assert "'crop_size': {'height': 224, 'width': 224}" in error and not (tmp_path / "o").exists()
