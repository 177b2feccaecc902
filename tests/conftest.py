"""Test-wide isolation: no network, no login prompts, no writes outside pytest's tmp dirs."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _offline_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("home")
    os.environ.update({
        "HF_HOME": str(home / "hf"),  # datasets' cache: never the user's
        "HF_HUB_OFFLINE": "1",  # the hub is unreachable here; fail fast instead of retrying
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "WANDB_MODE": "offline",  # never a login prompt, never a network call
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(home / "wandb"),
        "TQDM_DISABLE": "1",
    })


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One decoded-image cache for the whole session: decoding once is the point of the cache."""
    return str(tmp_path_factory.mktemp("tinydist-cache"))
