"""Names from the user's files are printed with their control characters escaped."""

import pytest

from ace_lora_hf.outputs.terminal import printable


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
