"""`ls tinydist/` draws the architecture: each layer imports only the layers before it (no import cycle),
and nothing below the entry modules imports them."""

from __future__ import annotations

import ast
from pathlib import Path

# train.py (the entry, with the step every caller runs) sits between the loop and what runs it: other engines
# (Ray Train) and the benchmarks that time it.
LAYERS = ["runtime", "config", "data", "ckpt", "model", "export", "loop", "train", "engines", "bench"]
PACKAGE = Path(__file__).resolve().parents[2] / "tinydist"


def imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "tinydist" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_package_is_a_layer_and_imports_only_the_layers_before_it():
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(set(LAYERS) - {"train"})
    wrong = []
    for layer in packages:
        allowed = set(LAYERS[:LAYERS.index(layer) + 1])
        for path in sorted((PACKAGE / layer).glob("*.py")):
            for other in imported_layers(path) - allowed:
                wrong.append(f"{path.relative_to(PACKAGE)} imports tinydist.{other}")
    assert not wrong, wrong


def test_the_entry_modules_are_thin():
    """The top level holds train.py and `python -m` entries that only hand over to their layer."""
    entries = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert set(entries) == {"__init__.py", "train.py", "evaluate.py", "predict.py", "report.py", "launch.py",
                            "ray.py"}
    assert all(lines <= 12 for name, lines in entries.items() if name not in ("train.py", "__init__.py")), entries
