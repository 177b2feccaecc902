"""Parsing the config's units: sizes (`10MB`) and save cadences (`15`, `auto`, `off`). Pure functions,
here so that checking a config imports neither storage nor the loop (and no torch)."""

from __future__ import annotations

import math
import re
from typing import Optional


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

def parse_size(size: str | int) -> int:
    """'500KB', '10MB', '2GB', '1GiB' or a positive int -> bytes (KB/MB/GB are powers of 10, like the HF hub)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    raise ValueError(f"max_shard_size {size!r} is not a size; expected bytes > 0 or e.g. '500KB', '10MB', '2GB'")


def parse_every_minutes(value: str) -> Optional[float]:
    """`off`/`0` -> None, `auto` -> nan (decided at run time), a positive number -> minutes; else ValueError."""
    text = str(value).strip().lower()
    if text in ("off", "false", "0", "0.0", "none", ""):  # YAML reads a bare `off` as false
        return None
    if text == "auto":
        return math.nan
    minutes = float(text)  # ValueError names the text
    if not minutes > 0 or math.isinf(minutes):
        raise ValueError(f"{value!r} is not a positive number of minutes")
    return minutes
