"""Text we hand back to people: safe to print on a terminal and safe to open in a spreadsheet.

Paths, class names and messages come from user files (a CSV, a folder tree). Printed raw, a control
character in a path can rewrite the terminal (ANSI escapes); written raw into a CSV, a cell starting with
`=`, `+`, `-` or `@` is run as a formula by Excel, LibreOffice and Google Sheets (CSV injection).
No imports beyond the standard library: every stage and the CLI use this.
"""

from __future__ import annotations

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1) written as a visible escape: '\\x1b', '\\n', ..."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def spreadsheet_cell(value: object) -> object:
    """A CSV cell that a spreadsheet shows as text: a string opening like a formula gets a leading apostrophe
    (the convention OWASP recommends; spreadsheets hide the apostrophe). Numbers pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value
