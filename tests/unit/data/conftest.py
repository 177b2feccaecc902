"""What the data tests share: a record of every decode-cache build."""

from __future__ import annotations

import pytest

from tinydist.data import cache as data


@pytest.fixture
def build_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folder of every cache build in the test, in order (the real build still runs)."""
    calls: list[str] = []
    original = data._build_cache

    def spy(src, cfg, folder, max_samples, log):
        calls.append(folder)
        return original(src, cfg, folder, max_samples, log)

    monkeypatch.setattr(data, "_build_cache", spy)
    return calls
