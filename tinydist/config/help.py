"""`--help` for every entry point that takes a config: each key with its section, type, default and
the comment above its field in schema.py (read from the source, so the two cannot drift)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import os
import textwrap
import tokenize
import typing
from typing import Any

from tinydist.config.schema import CHOICES, TRACKERS, Config, get

@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment lines directly above it, joined} of dataclass `cls`, read from its source;
    {} when the source cannot be read (e.g. only .pyc files installed)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        lines = source.splitlines()
        own_line = {}  # row -> text of a comment that is alone on its line
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and not lines[tok.start[0] - 1][:tok.start[1]].strip():
                own_line[tok.start[0]] = tok.string.lstrip("#").strip()
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    comments: dict[str, str] = {}
    for item in node.body if node else []:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            row, parts = item.lineno - 1, []
            while row in own_line:
                parts.insert(0, own_line[row])
                row -= 1
            comments[item.target.id] = " ".join(p for p in parts if p)
    return comments


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _show(value: Any) -> str:
    """A default as it would be written on the command line or in a recipe."""
    if isinstance(value, str):
        return value if value and value.strip() == value else json.dumps(value)
    return json.dumps(value)


def _recipes_line() -> str:
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith((".yaml", ".yml")))
    except OSError:
        names = []
    if not names:
        return "Recipes (YAML, one mapping per section) live in configs/ of the tinydist repository."
    where = os.path.relpath(folder) if folder.startswith(os.getcwd() + os.sep) else folder
    shown = [f"{n} (offline, no download)" if n == "smoke.yaml" else n for n in names]
    return f"Recipes (YAML, one mapping per section) live in {where}/: {', '.join(shown)}."


def help_text(prog: str, usage: str = "", about: str = "") -> str:
    """What `--help` prints: usage, where recipes live, then every key by section (in the order of
    `Config`), each with its type, default and the comment above its field. `usage`, if given,
    replaces the first usage line (an entry point with options of its own); `about` comes first
    after the usage lines."""
    width = 100

    def wrap(text: str, indent: str = "") -> list[str]:
        return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                             break_long_words=False, break_on_hyphens=False)

    out = [f"usage: {usage or f'{prog} --config FILE [--section.key=VALUE ...]'}",
           f"       {prog} --config FILE [--section.key VALUE ...]", ""]
    if about:
        out += wrap(about) + [""]
    for paragraph in (
            "A run is one typed config: the defaults below <- the YAML recipe given with --config <- the "
            "--section.key overrides, left to right (a later one wins). Values are YAML: "
            "--train.max_steps=null, --log.report_to=[tensorboard,wandb].",
            _recipes_line(),
            "Print the resolved config without running: python -m tinydist.config --config FILE "
            "[--section.key=VALUE ...]",
            "Exit codes: 0 done, 2 bad config/data/checkpoint (do not relaunch), 69 transient, 75 stopped "
            "after a checkpoint; see README.md \"Exit codes\"."):
        out += wrap(paragraph)
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        comments = field_comments(cls)
        out += ["", f"[{section.name}]"]
        for name, hint in typing.get_type_hints(cls).items():
            key = f"{section.name}.{name}"
            out.append(f"  {key}: {_type_name(hint)} = {_show(get(defaults, key))}")
            text = comments.get(name, "")
            allowed = CHOICES.get(key) or (TRACKERS if key == "log.report_to" else ())
            if any(f"`{a}`" not in text for a in allowed):  # the comment does not name them all
                text += f" {'Any' if key == 'log.report_to' else 'One'} of: {', '.join(allowed)}."
            out += wrap(text.strip(), " " * 6)
    return "\n".join(out) + "\n"
