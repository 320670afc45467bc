"""Shared test set-up: deterministic threads, and one toolchain for every subprocess."""

import os
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(2)
# DeepSpeed JIT-builds a comm op with the first `ninja` on PATH and rebuilds it (~35 s) when that
# changes: put this interpreter's bin directory first for every process the tests start.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# ...and one build cache for every process of the session (torchrun and Slurm children, the Ray
# head's workers, whose $HOME is a temporary one): each new cache dir costs a ~40 s compile.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "fne_dist-torch-extensions")
)

# One real single-node Slurm, one real Prometheus (and the Ray temp dir it watches) per session,
# for every test that asks for them (each skips without its Debian package).
from tests.fixtures_prometheus import prometheus, ray_temp_root  # noqa: E402, F401
from tests.fixtures_slurm import slurm_cluster  # noqa: E402, F401

# A test that starts a process or a server fails unless it is marked `system` (what counts:
# tests/process_guard.py); pytester runs that check on a made-up test (test_process_guard.py).
pytest_plugins = ["pytester", "tests.process_guard"]


def pytest_collection_modifyitems(items: list) -> None:
    """The unit tier runs first, then the system tests in their usual order: a unit failure
    shows within the first minutes, and .ci/run's background build of DeepSpeed's op has the
    unit tier's time to finish before the first run needs it."""
    items.sort(key=lambda item: item.get_closest_marker("system") is not None)
