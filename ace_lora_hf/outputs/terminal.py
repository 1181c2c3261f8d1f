"""Text from the user's files (image names, labels, table cells) as it is safe to print: control characters shown as
escapes, so a file named with a terminal escape sequence cannot clear the screen, move the cursor or forge rows."""

import unicodedata


# Cc: C0 and C1 controls (escape, carriage return, ...); Cf: bidirectional overrides and other invisible formats;
# Zl, Zp: the Unicode line and paragraph separators, which end a line in some terminals and viewers.
CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


def printable(text: str) -> str:
    """`text` with every control or invisible formatting character replaced by its Python escape (`\\x1b`)."""
    return "".join(character.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(character) in CONTROL_CATEGORIES else character for character in text)


__all__ = ["printable"]
