"""Names from the user's files are printed with their control characters escaped."""

import shutil

import pytest

from ace_lora_hf.cli.common import EXIT_INPUTS_SKIPPED, EXIT_USER_ERROR, run_cli
from ace_lora_hf.outputs.terminal import printable

from conftest import SAMPLES


@pytest.mark.parametrize("name, shown", [
    ("scan\x1b[2J.png", "scan\\x1b[2J.png"),            # clear screen
    ("a\rrow forged.png", "a\\rrow forged.png"),        # back to the line start
    ("x\n0.99 pneumonia.png", "x\\n0.99 pneumonia.png"),
    ("gnp.\u202eexe", "gnp.\\u202eexe"),                # right-to-left override
    ("a\u2028b.dcm", "a\\u2028b.dcm"),                  # line separator
    ("Röntgen 胸部.png", "Röntgen 胸部.png"),           # letters of any script stay
])
def test_control_characters_are_shown_as_escapes(name, shown):
    assert printable(name) == shown


def test_classify_prints_hostile_file_names_escaped(tiny_hub_folder, tmp_path, capsys):
    from ace_lora_hf.cli.classify import main

    hostile = tmp_path / "scan\x1b[2J\r0.99 pneumonia.png"
    shutil.copy(SAMPLES / "nih_00000001_000.png", hostile)
    (tmp_path / "bad\x1b]0;title\x07.png").write_text("not an image")
    assert main(["--model", str(tiny_hub_folder), "--images", str(tmp_path)]) == EXIT_INPUTS_SKIPPED
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "scan\\x1b[2J\\r0.99 pneumonia.png" in out and "bad\\x1b]0;title\\x07.png" in out


def test_an_error_naming_a_hostile_file_is_one_escaped_line(tmp_path, capsys):
    from ace_lora_hf.cli.classify import main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--images", str(tmp_path / "gone\x1b[2J.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USER_ERROR and len(err.strip().splitlines()) == 1
    assert "\x1b" not in err and "gone\\x1b[2J.png" in err
