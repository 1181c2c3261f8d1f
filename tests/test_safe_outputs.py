"""Outputs never replace inputs, are written atomically, and a folder in use by another job is refused."""

import errno
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ace_lora_hf.cli.common import EXIT_USER_ERROR, run_cli
from ace_lora_hf.errors import DataFormatError, FolderInUseError, OutputPathError
from ace_lora_hf.outputs.result_files import ResultsFile
from ace_lora_hf.outputs.safe_outputs import (atomic_folder, check_output_file, check_output_folder,
                                              folder_lock, write_text_atomic)


def test_output_file_is_never_an_input_even_with_overwrite(tmp_path):
    scan = tmp_path / "scan.png"
    scan.write_bytes(b"x-ray")
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_file(tmp_path / "." / "scan.png", inputs=[scan], overwrite=True)
    assert scan.read_bytes() == b"x-ray"


def test_output_file_checks(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(OutputPathError, match="exists; pass --overwrite"):
        check_output_file(tmp_path / "old.json")
    assert check_output_file(tmp_path / "old.json", overwrite=True) == tmp_path / "old.json"
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_file(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_file(tmp_path / "afile" / "out.json")
    created = check_output_file(tmp_path / "new" / "deep" / "out.json")
    assert created.parent.is_dir() and not created.exists()


def test_output_folder_checks(tmp_path):
    table = tmp_path / "data" / "table.csv"
    table.parent.mkdir()
    table.write_text("a\n")
    with pytest.raises(OutputPathError, match="holds an input"):
        check_output_folder(tmp_path, inputs=[table], overwrite=True)
    with pytest.raises(OutputPathError, match="not empty"):
        check_output_folder(tmp_path / "data")
    with pytest.raises(OutputPathError, match="is a file"):
        check_output_folder(table)


def test_atomic_writes_leave_the_old_output_when_interrupted(tmp_path):
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")
    folder = tmp_path / "model"
    with atomic_folder(folder) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(folder) as staging:
            (staging / "weights").write_text("new, half written")
            raise RuntimeError("disk failed")
    assert (folder / "weights").read_text() == "old"
    with atomic_folder(folder) as staging:
        (staging / "weights").write_text("new")
    assert (folder / "weights").read_text() == "new"
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results.json"]


def _hold_lock(folder, ready, release):
    with folder_lock(folder):
        ready.set()
        release.wait(30)


def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path / "run", ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(FolderInUseError, match="in use by another running job"):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        release.set()
        holder.join(30)
    with folder_lock(tmp_path / "run"):  # free again once the other job ended
        pass


def _fails_with(error):
    def main(argv):
        raise error
    return main


def test_user_errors_are_one_line_without_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_fails_with(DataFormatError("table.csv, row 3: column 'Target' is 'abc'; expected 0 or 1.\nmore")))
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "error: table.csv, row 3: column 'Target' is 'abc'; expected 0 or 1. more" in err


def test_disk_full_is_one_line_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_fails_with(OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors")))
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "no space left on the device while writing out/model.safetensors" in capsys.readouterr().err
    with pytest.raises(KeyError):
        run_cli(_fails_with(KeyError("a bug")))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: 3)
    assert exit_info.value.code == 3


def test_a_saved_model_folder_is_readable_by_the_users_group(tiny_model, tmp_path):
    """transformers writes model.safetensors as 0600; a folder written by the package follows the umask."""
    previous = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as staging:
            tiny_model.save_pretrained(staging)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "model").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    from ace_lora_hf.outputs import safe_outputs
    from ace_lora_hf.outputs.result_files import ResultsFile

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "results.csv.partial.tmp").symlink_to(victim)  # the name 0.1 used
    results = ResultsFile(tmp_path / "results.csv", ["a", "b"])
    results.write([{"image": "x.png", "probabilities": {"a": 0.5, "b": 0.5}, "prediction": "a"}])
    results.finish({})
    monkeypatch.setattr(safe_outputs.secrets, "token_hex", lambda _: "guessed")  # an attacker who guesses the name
    (tmp_path / ".out.txt.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_text_atomic(tmp_path / "out.txt", "new")
    assert victim.read_text() == "precious" and not (tmp_path / "out.txt").exists()


def test_a_folder_named_through_a_link_is_the_same_folder_in_use(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path / "runs" / "ace", ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(FolderInUseError, match="in use by another running job"):
            with folder_lock(tmp_path / "link" / "ace", "--output_dir"):
                pass
    finally:
        release.set()
        holder.join(30)


def test_a_temporary_folder_left_by_a_killed_writer_is_removed_by_the_next(tmp_path):
    script = ("import os, signal, sys\n"
              "from ace_lora_hf.outputs.safe_outputs import atomic_folder\n"
              "with atomic_folder(sys.argv[1]) as staging:\n"
              "    (staging / 'weights').write_text('half')\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "best")], capture_output=True)
    assert killed.returncode == -signal.SIGTERM
    assert [path.name.endswith(".staging") for path in tmp_path.iterdir()] == [True]
    with atomic_folder(tmp_path / "best") as staging:
        (staging / "weights").write_text("whole")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best"]
    (tmp_path / "other").mkdir()
    (tmp_path / ".other.1234.staging").mkdir()  # another folder's: not ours to remove
    with atomic_folder(tmp_path / "best"):
        pass
    assert (tmp_path / ".other.1234.staging").is_dir()


def test_the_lock_file_goes_when_the_job_ends_and_a_late_opener_takes_a_fresh_one(tmp_path, monkeypatch):
    lock = tmp_path / ".run.lock"
    opened = []
    real_open = os.open

    def open_late_first(path, *args):
        if not opened:  # this job opens the lock file just before the job holding it ends and removes it
            opened.append(real_open(path, *args))
            with folder_lock(tmp_path / "run"):
                pass
            return opened[0]
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", open_late_first)
    with folder_lock(tmp_path / "run"):
        assert lock.exists()  # a fresh lock file, held: the removed one would have guarded nothing
    monkeypatch.undo()
    assert not lock.exists()
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path / "run"):
            raise RuntimeError("the job failed")
    assert not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _run_refused(write, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(write)
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and "Traceback" not in err and err.count("\n") == 1
    return err


def test_a_full_disk_in_safetensors_names_the_folder_and_leaves_nothing(tmp_path, capsys):
    """safetensors reports a full disk as its own error, without a file name: the one line names the folder."""
    def write(argv):
        with atomic_folder(tmp_path / "final") as staging:
            save_file({"w": torch.zeros(4)}, staging / "model.safetensors")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    err = _run_refused(write, capsys)
    assert f"no space left on the device while writing {tmp_path / 'final'};" in err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_a_flush_names_the_results_file(tmp_path, monkeypatch, capsys):
    def write(argv):
        results = ResultsFile(tmp_path / "results.csv", ["a", "b"])
        monkeypatch.setattr(results, "_file", FailingFile(results._file))
        results.write([{"image": "x.png", "probabilities": {"a": 0.5, "b": 0.5}, "prediction": "a"}])

    err = _run_refused(write, capsys)
    assert f"no space left on the device while writing {tmp_path / 'results.csv.partial'};" in err


class FailingFile:
    """A text file whose flush finds the disk full, as a buffered write does."""

    def __init__(self, file):
        self.file = file

    def write(self, text):
        return self.file.write(text)

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_bug_in_a_loader_worker_keeps_its_traceback():
    wrapped = RuntimeError("Caught ZeroDivisionError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1, in f\nZeroDivisionError: division by zero")
    with pytest.raises(RuntimeError, match="Caught ZeroDivisionError"):
        run_cli(_fails_with(wrapped))
