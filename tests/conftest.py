"""Shared test set-up: deterministic threads, and one toolchain for every subprocess."""

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(2)
# DeepSpeed JIT-builds a comm op with the first `ninja` on PATH and rebuilds it (~35 s) when that
# changes: put this interpreter's bin directory first for every process the tests start.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# One real single-node Slurm per session, for every test that asks for it (skips without Slurm).
from tests.fixtures_slurm import slurm_cluster  # noqa: E402, F401
