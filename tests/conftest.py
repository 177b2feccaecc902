"""Test-wide isolation (no network, no login prompts, no writes outside pytest's tmp dirs) and the
fixtures several modules share.

Layout: `unit/<layer>/` mirrors tinydist's packages (mostly fast tests), `integration/` holds the runs,
launchers, faults and several machines (marked slow). Imports: tinydist is installed (`pip install -e .`),
so no test module touches sys.path; the shared helpers are the package `helpers` next to this file
(helpers.train: subprocess runs; helpers.faultinject: injectors, ports, moto; helpers.fixtures:
datasets), importable because pytest's default import mode ("prepend") puts this directory first on
sys.path when it loads this conftest. Test file names are unique across folders (that mode needs it).

Markers (setup.cfg): `slow` is every test that starts training processes, launchers, moto-backed runs
or injected faults; `pytest -m "not slow"` is the fast loop.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Iterator

import pytest

from helpers.faultinject import aws_test_env, moto_server


# Set here, when pytest loads this file, not in a fixture: huggingface_hub and datasets read these at
# import, and collecting the test modules imports them (the checkpoint layout uses huggingface_hub). Set
# later, the hub is not offline for them: each hub test then retried a dead network for ~23 s.
_HOME = tempfile.mkdtemp(prefix="tinydist-tests-home-")
# Removed when this process exits: under xdist the controller loads this file too but runs no session
# fixture, and left its folder behind on every `-n 2` run.
atexit.register(shutil.rmtree, _HOME, True)
os.environ.update({
    "HF_HOME": os.path.join(_HOME, "hf"),  # datasets' cache: never the user's
    "HF_HUB_OFFLINE": "1",  # the hub is unreachable here; fail fast instead of retrying
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "WANDB_MODE": "offline",  # never a login prompt, never a network call
    "WANDB_SILENT": "true",
    "WANDB_DIR": os.path.join(_HOME, "wandb"),
    "TQDM_DISABLE": "1",
})
# Under `-n N` each pytest worker gets its share of the cores for the torch work it does in process (the
# benches read OMP_NUM_THREADS too: bench.common.machine_threads), and the processes it starts inherit it.
# Two workers of two threads each on a 2-core machine spin against each other: `bench quality`'s end-to-end
# test took 457 s beside the other worker's runs, ~80 s alone.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True, scope="session")
def _offline_environment() -> Iterator[None]:
    """The environment above for the whole session; its home folder removed at the end (and at exit)."""
    yield
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One decoded-image cache for the whole session: decoding once is the point of the cache."""
    return str(tmp_path_factory.mktemp("tinydist-cache"))


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """This process talks to a local S3 only: test credentials, nothing from the developer's shell
    (profile, session token, proxy, endpoint) for the module's tests; see helpers.faultinject.aws_test_env."""
    with aws_test_env():
        yield


@pytest.fixture(scope="module")
def moto(aws_env: None) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (one per module); its endpoint URL. Make a bucket per test with
    helpers.faultinject.make_bucket(moto)."""
    with moto_server() as url:
        yield url
