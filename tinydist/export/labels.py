"""Human-readable names of a run's classes, for the exported model's config.json and model card.

Classes are what data.py calls them: WordNet ids (`n01443537`) for Tiny ImageNet, whatever a
ClassLabel says otherwise. Names come only from what is on this machine, never from the hub:

- a tiny-imagenet-200 folder source: its `words.txt` (`n01443537<TAB>goldfish, Carassius auratus`);
- a class that is not a WordNet id (e.g. `digit_3`, or a ClassLabel of plain words) is its own name.

A WordNet id with no name found is left out: a reader falls back to the id.
"""

from __future__ import annotations

import os
import re
from typing import Any

WNID = re.compile(r"^n\d{8}$")


def class_names(data_cfg: Any, classes: list[str]) -> dict[str, str]:
    """{class: name} for the classes whose name is known (data_cfg: a DataConfig, only `.source` is read).
    Never fails an export: an unreadable words.txt just gives no names."""
    names = {c: c for c in classes if not WNID.match(c)}
    wanted = {c for c in classes if WNID.match(c)}
    if wanted:
        names.update(_words(data_cfg.source, wanted))
    return names


def _words(source: str, wanted: set[str]) -> dict[str, str]:
    if source == "digits":  # data.py's offline sample, not a folder (even if one of that name exists)
        return {}
    path = os.path.expanduser(source)
    # The roots data.py accepts for a tiny-imagenet-200 source: the folder itself or its parent.
    for root in (path, os.path.join(path, "tiny-imagenet-200")):
        words = os.path.join(root, "words.txt")
        if os.path.isfile(words):
            return read_words(words, wanted)
    return {}


def read_words(path: str, wanted: set[str]) -> dict[str, str]:
    """`wnid<TAB>names` lines of a words.txt (82k lines for all of WordNet), only the `wanted` ids."""
    found: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                wnid, sep, name = line.rstrip("\n").partition("\t")
                if sep and wnid in wanted and name.strip():
                    found[wnid] = name.strip()
    except OSError:  # names are a nicety: a file we cannot read gives none, it does not stop an export
        return {}
    return found
