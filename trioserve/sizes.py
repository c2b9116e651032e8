"""Memory sizes as people write them in a config ("6 GiB", "512 MiB", "20GB") and as we print
them ("6.0 GiB"). Bytes are ints everywhere else."""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    # Binary units, and their one-letter forms as llama.cpp and Ollama print them.
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: object) -> int:
    """Bytes from an int (bytes) or a string such as ``"6 GiB"``; ``ValueError`` says why not."""
    if isinstance(value, bool):
        raise ValueError(f"a size is a number of bytes or a string such as '6 GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative, not {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size is a number of bytes or a string such as '6 GiB', not {value!r}")
    match = _SIZE.fullmatch(value)
    unit = match and _UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise ValueError(
            f"{value!r} is not a size: write a number and a unit, e.g. '6 GiB', '512 MiB', "
            "'20 GB' (KiB/MiB/GiB/TiB or K/M/G/T: powers of 1024; KB/MB/GB/TB: of 1000)"
        )
    return round(float(match.group(1)) * unit)


def format_size(size: int) -> str:
    """``6442450944`` -> ``"6.0 GiB"``: one decimal in the largest binary unit that fits."""
    for unit, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(size) >= unit:
            return f"{size / unit:.1f} {name}"
    return f"{size} B"
