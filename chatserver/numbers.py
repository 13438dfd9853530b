"""Whole numbers read from outside (the wire, the environment, the command line): ASCII digits only.

`str.isdigit()` accepts '²' and '①' (which `int()` refuses), and `str.isdecimal()` alone accepts the digits
of other scripts (which `int()` reads): a cursor, a length or a descriptor number must have one spelling.
"""

from __future__ import annotations


def is_ascii_decimal(text: str) -> bool:
    """True when `text` is one or more of the digits 0-9 and nothing else."""
    return text.isascii() and text.isdecimal()
