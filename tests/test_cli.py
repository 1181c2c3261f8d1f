"""The command lines as one family: the same options everywhere, --help without torch, devices refused rather than
replaced, inputs checked before the model loads, and every command reading a training run's checkpoint like the
complete model folder `materialize_checkpoint` makes of it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ace_lora_hf import load
from ace_lora_hf.cli import app, classify, evaluate, options, retrieval
from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.errors import InvalidArgumentError
from ace_lora_hf.training import materialize_checkpoint

from conftest import REPO_ROOT, SAMPLES
from test_training import pretrain_command, run_pretrain, synthetic_data  # noqa: F401 (a fixture)


COMMANDS = ("app", "classify", "convert", "evaluate", "export_onnx", "fewshot", "publish", "retrieval")
IMAGE = SAMPLES / "nih_00000001_000.png"


def exit_of(main, argv, capsys) -> tuple[int, str]:
    """`main` as a user runs it: its exit status and its stderr, which must be one line without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(argument) for argument in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if ": error: " in line]) == 1, err
    return exit_info.value.code, err


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if any command starts loading a model."""
    from ace_lora_hf.sources import load as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load", refuse)


# ------------------------------------------------------------------------------------------------------ --help

# Imports each command module with the top-level package stubbed out, then runs --help; prints the heavy packages
# the command module itself imported.
HELP_WITHOUT_PACKAGE_INIT = """
import importlib, importlib.util, sys, types
spec = importlib.util.find_spec("ace_lora_hf")
package = types.ModuleType("ace_lora_hf")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["ace_lora_hf"] = package
for name in sys.argv[1:]:
    try:
        importlib.import_module(f"ace_lora_hf.cli.{name}").parse_args(["--help"])
    except SystemExit:
        pass
    heavy = [module for module in ("torch", "transformers", "accelerate") if module in sys.modules]
    print("imported:", name, *heavy)
"""


def test_help_of_every_command_imports_neither_torch_nor_transformers():
    finished = subprocess.run([sys.executable, "-c", HELP_WITHOUT_PACKAGE_INIT, *COMMANDS], capture_output=True,
                              text=True, check=True)
    lines = [line.removeprefix("imported: ") for line in finished.stdout.splitlines() if line.startswith("imported: ")]
    assert lines == list(COMMANDS), lines  # a command followed by torch, transformers or accelerate imports them


@pytest.mark.parametrize("command", [app, classify, evaluate, retrieval])
def test_help_lists_each_option_once_in_its_dash_spelling(command, capsys):
    with pytest.raises(SystemExit):
        command.parse_args(["--help"])
    shown = capsys.readouterr().out
    for option in ("--model", "--revision", "--biomedclip", "--adapters", "--device"):
        assert shown.count(f"{option} ") + shown.count(f"{option}\n") >= 1, option
    assert "--batch_size" not in shown and "--ace-checkpoint" not in shown and "--num_workers" not in shown


def test_underscore_and_old_spellings_are_aliases():
    dashed = classify.parse_args(["--images", "a.png", "--batch-size", "4", "--num-workers", "0", "--adapters", "x"])
    aliased = classify.parse_args(["--images", "a.png", "--batch_size", "4", "--num_workers", "0",
                                   "--ace-checkpoint", "x"])
    assert vars(dashed) == vars(aliased)
    assert (aliased.batch_size, aliased.num_workers, aliased.adapters) == (4, 0, "x")


def test_usage_errors_name_the_dash_spelling(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--dataset", "rsna", "--batch_size", "0"])
    err = capsys.readouterr().err
    assert "argument --batch-size: '0'" in err and "--data-root" in err and "_" not in err.split("error: ")[1]


def test_shared_names_match_the_libraries_they_stand_for():
    from ace_lora_hf.evaluation.benchmarks import BENCHMARKS
    from ace_lora_hf.evaluation.retrieval import MATCHES
    from ace_lora_hf.publishing.model_card import BIOMEDCLIP
    from ace_lora_hf.sources.folders import BIOMEDCLIP_REPO_ID
    from ace_lora_hf.sources.released_adapters import RELEASED

    assert evaluate.DATASETS == tuple(sorted(BENCHMARKS)) and retrieval.MATCHES == MATCHES
    assert options.RELEASED == RELEASED and options.BIOMEDCLIP_REPO_ID == BIOMEDCLIP_REPO_ID == BIOMEDCLIP


# ------------------------------------------------------------------------------------------------ dataset names


@pytest.mark.parametrize(("given", "name"), [("chexpert_5x200", "chexpert_5x200"), ("chexpert5x200", "chexpert_5x200"),
                                             ("chestxray14", "chestxray14"), ("nih14", "chestxray14"),
                                             ("rsna", "rsna")])
def test_evaluate_takes_the_prepare_names_and_the_old_ones(given, name):
    assert evaluate.parse_args(["--dataset", given, "--data-root", "."]).dataset == [name]


def test_every_prepared_benchmark_but_mimic_is_an_evaluate_name():
    from dataset_prep.__main__ import DATASETS as PREPARED

    # mimic_cxr is for ace-lora-retrieval; training-set prepares a user's training table, not a benchmark
    expected = {name for dataset in PREPARED if dataset not in ("mimic_cxr", "training-set")
                for name in ((f"{dataset}_lung", f"{dataset}_colon") if dataset == "lc25000" else (dataset,))}
    assert set(evaluate.DATASETS) == expected


def test_an_unknown_dataset_is_a_usage_error(capsys):
    code, err = exit_of(evaluate.main, ["--dataset", "chexpert", "--data-root", "."], capsys)
    assert code == EXIT_USER_ERROR and "'chexpert' is not a benchmark" in err


# ---------------------------------------------------------------------------------------- checks before loading


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_device_this_machine_lacks_is_refused_not_replaced(device, no_loading, capsys):
    code, err = exit_of(classify.main, ["--images", IMAGE, "--device", device], capsys)
    assert code == EXIT_USER_ERROR and f"--device {device}: this machine has no CUDA GPU" in err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the refusal where MPS is absent")
def test_mps_where_absent_is_refused(no_loading, capsys):
    code, err = exit_of(classify.main, ["--images", IMAGE, "--device", "mps"], capsys)
    assert code == EXIT_USER_ERROR and "--device mps: Apple's MPS is not available" in err


def test_a_misspelt_device_is_a_usage_error(capsys):
    code, err = exit_of(classify.main, ["--images", IMAGE, "--device", "gpu"], capsys)
    assert code == EXIT_USER_ERROR and "'gpu' is not a device" in err


@pytest.mark.parametrize(("main", "argv", "message"), [
    (classify.main, ["--images", "scans/typo.png"], "--images scans/typo.png: no such image file or folder"),
    (classify.main, ["--csv", "typo.csv"], "--csv typo.csv: no such file or folder"),
    (classify.main, ["--image-list", "typo.txt"], "--image-list typo.txt: no such file or folder"),
    (evaluate.main, ["--dataset", "rsna", "--data-root", "typo/"], "--data-root typo: no such folder"),
    (evaluate.main, ["--dataset", "rsna", "--data-root", ".", "--table", "typo.csv"], "--table typo.csv: no such"),
    (retrieval.main, ["--table", "typo.csv"], "--table typo.csv: no such file"),
])
def test_a_mistyped_input_path_is_one_line_before_any_model_loads(main, argv, message, no_loading, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = exit_of(main, argv, capsys)
    assert code == EXIT_USER_ERROR and message in err


def test_released_model_options_beside_another_model_are_refused(tiny_hub_folder, no_loading, capsys):
    code, err = exit_of(classify.main, ["--images", IMAGE, "--model", tiny_hub_folder, "--adapters", "x.pt"], capsys)
    assert code == EXIT_USER_ERROR and "--adapters builds the released model" in err


def test_publish_offline_names_options_it_has(tmp_path, capsys):
    """Without the network, the released model's message names --biomedclip, which ace-lora-publish now takes."""
    from ace_lora_hf.cli import publish

    args = publish.parse_args(["--repo-id", "me/x", "--staging", str(tmp_path), "--biomedclip", str(tmp_path)])
    assert args.biomedclip == str(tmp_path) and str(args.model) == options.RELEASED


def test_under_accelerate_launch_a_user_error_is_one_line(tmp_path):
    """accelerate's launcher turns any failing child into its own exit status 1 (with a traceback unless --quiet):
    the command's one line is still all the user reads."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--cpu", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1"]
    script = REPO_ROOT / "hf_model_inference.py"
    finished = subprocess.run([*launch, str(script), "--images", str(tmp_path / "typo.png")], capture_output=True,
                              text=True)
    errors = [line for line in finished.stderr.splitlines() if ": error: " in line]
    assert finished.returncode != 0 and "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert errors == [f"hf_model_inference.py: error: --images {tmp_path / 'typo.png'}: no such image file or folder; "
                      "check the path."]


def test_several_processes_print_an_error_they_all_meet_once(monkeypatch, capsys):
    """An error every process meets alike (marked as such, or a usage error) is printed by the first process of the
    machine; a later one waits for the launcher to stop it and prints the error itself only if it is not stopped.
    Any other error is printed by each process that meets it, after its rank."""
    from ace_lora_hf.outputs import launched_processes

    @launched_processes.checks_alike_in_every_process()
    def fails_alike(argv):
        raise InvalidArgumentError("--train_file t.csv not found.")

    @launched_processes.checks_alike_in_every_process()
    def fails_alone(argv):
        with launched_processes.work_of_this_process():
            raise InvalidArgumentError("line 3: x.png is not an image.")

    def fails_unmarked(argv):
        raise InvalidArgumentError("disk full.")

    waits = []
    monkeypatch.setattr(launched_processes, "wait_for_the_first_process", lambda: waits.append(1))
    monkeypatch.setattr(sys, "argv", ["pretrain.py"])
    lines = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        for main in (fails_alike, fails_alone, fails_unmarked):
            with pytest.raises(SystemExit) as exit_info:
                run_cli(main, [])
            assert exit_info.value.code == EXIT_USER_ERROR
            lines[rank, main.__name__] = capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_info:
            classify.parse_args(["--images", "a.png", "--batch-size", "0"])
        assert exit_info.value.code == EXIT_USER_ERROR
        lines[rank, "usage"] = capsys.readouterr().err.splitlines()[-1]
        lines[rank, "waits"] = len(waits)
    assert lines["0", "waits"] == 0 and lines["1", "waits"] == 2  # the alike error and the usage error
    assert lines["0", "fails_alike"] == "pretrain.py: error: --train_file t.csv not found.\n"
    assert lines["1", "fails_alike"] == "pretrain.py: error: process 1: --train_file t.csv not found.\n"
    assert lines["0", "usage"] == lines["1", "usage"] and "--batch-size" in lines["0", "usage"]
    for rank in ("0", "1"):
        assert lines[rank, "fails_alone"] == f"pretrain.py: error: process {rank}: line 3: x.png is not an image.\n"
        assert lines[rank, "fails_unmarked"] == f"pretrain.py: error: process {rank}: disk full.\n"


def test_a_later_process_left_running_by_the_launcher_still_prints(monkeypatch, capsys):
    """A command that inherits a launcher's environment (no launcher stops it) prints after the wait, and a
    malformed WORLD_SIZE is read as one process."""
    from ace_lora_hf.outputs import launched_processes

    monkeypatch.setattr(launched_processes, "FIRST_PROCESS_GRACE_S", 0.01)
    monkeypatch.setattr(sys, "argv", ["ace-lora-classify"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    assert exit_of(classify.main, ["--images", "typo.png"], capsys)[1].startswith(
        "ace-lora-classify: error: process 3: --images typo.png: no such image file or folder")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert exit_of(classify.main, ["--images", "typo.png"], capsys)[1].startswith(
        "ace-lora-classify: error: --images typo.png: no such image file or folder")


# ------------------------------------------------------------------------------- a training run as --model


@pytest.fixture(scope="module")
def trained_run(tiny_hub_folder, synthetic_data, tmp_path_factory):  # noqa: F811
    """A two-step pretraining run, and the complete model folder materialized from its best/."""
    run = tmp_path_factory.mktemp("cli_run") / "run"
    run_pretrain(pretrain_command(tiny_hub_folder, synthetic_data, run, "--max_train_steps", 2,
                                  "--validation_file", synthetic_data / "validation.csv"))
    folder = materialize_checkpoint(run / "best", tmp_path_factory.mktemp("materialized") / "model")
    return run, folder


def run_ok(main, argv) -> None:
    from accelerate.state import AcceleratorState, GradientState

    try:
        assert main([str(argument) for argument in argv]) == 0
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def classify_probabilities(model, images, output) -> np.ndarray:
    run_ok(classify.main, ["--model", model, "--images", images, "--output", output, "--device", "cpu", "--quiet"])
    results = json.loads(output.read_text())["results"]
    return np.array([list(result["probabilities"].values()) for result in results])


def test_classify_reads_a_run_and_its_best_like_the_materialized_folder(trained_run, synthetic_data,  # noqa: F811
                                                                        tmp_path):
    run, folder = trained_run
    images = synthetic_data / "images"
    expected = classify_probabilities(folder, images, tmp_path / "folder.json")
    np.testing.assert_allclose(classify_probabilities(run / "best", images, tmp_path / "best.json"), expected,
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(classify_probabilities(run, images, tmp_path / "run.json"), expected, atol=1e-6, rtol=0)


def test_evaluate_reads_a_checkpoint_like_the_materialized_folder(trained_run, synthetic_data, tmp_path):  # noqa: F811
    run, folder = trained_run
    table = tmp_path / "rsna_classification.csv"
    rows = [line.split(",") for line in (synthetic_data / "validation.csv").read_text().splitlines()[1:]]
    table.write_text("Path,Target,split\n" + "".join(f"{path},{target},test\n" for path, target in rows))
    probabilities = []
    for model in (run / "best", folder):
        output = tmp_path / f"{model.name}.json"
        run_ok(evaluate.main, ["--dataset", "rsna", "--data-root", synthetic_data, "--table", table, "--model", model,
                               "--bootstrap", 2, "--device", "cpu", "--output", output])
        images = json.loads(output.read_text())["datasets"]["rsna"]["images"]
        probabilities.append(np.array([image["probabilities"] for image in images]))
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-6, rtol=0)


def test_retrieval_reads_a_checkpoint_like_the_materialized_folder(trained_run, synthetic_data, tmp_path):  # noqa: F811
    run, folder = trained_run
    embeddings = []
    for model in (run / "best", folder):
        output = tmp_path / f"{model.name}.json"
        run_ok(retrieval.main, ["--table", synthetic_data / "train.csv", "--model", model, "--device", "cpu",
                                "--cache-dir", tmp_path / f"cache_{model.name}", "--output", output])
        embeddings.append(load_file(json.loads(output.read_text())["embeddings"]["file"]))
    for name in ("images", "reports"):
        torch.testing.assert_close(embeddings[0][name], embeddings[1][name], atol=1e-6, rtol=0)


def test_the_app_loads_a_checkpoint_like_the_materialized_folder(trained_run):
    run, folder = trained_run
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds = []
    for model in (run / "best", folder):
        loaded = app.load_demo_model(app.parse_args(["--model", str(model), "--device", "cpu"]))
        with torch.no_grad():
            embeds.append(loaded.model.get_image_features(pixel_values).pooler_output)
    torch.testing.assert_close(embeds[0], embeds[1], atol=1e-6, rtol=0)


def test_export_onnx_reads_a_checkpoint_like_the_materialized_folder(trained_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra: pip install 'ace-lora-hf[onnx]'")
    from ace_lora_hf.cli import export_onnx
    from ace_lora_hf.publishing.export_onnx import run_onnx

    run, folder = trained_run
    pixel_values = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    export_onnx.main(["--model", str(run / "best"), "--output", str(tmp_path / "onnx")])
    exported = run_onnx(tmp_path / "onnx" / "vision.onnx", {"pixel_values": pixel_values})
    materialized = load(folder).model  # the export's own check compares ONNX with PyTorch; one export is enough
    with torch.no_grad():
        expected = materialized.get_image_features(torch.from_numpy(pixel_values)).pooler_output.numpy()
    np.testing.assert_allclose(exported, expected, atol=1e-5, rtol=0)
