"""A build lock left by a killed process never hangs a later start."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fne_dist.engine import SHM_OP, jit_build_guard

ROOT = Path(__file__).resolve().parents[1]
SHARED_EXTENSIONS = Path(tempfile.gettempdir()) / "fne_dist-torch-extensions"


def test_hostile_stale_build_lock_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant: inside the guard, a build lock that no live process of ours holds is gone,
    and the warning names it (torch would otherwise wait on it forever)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    baton = tmp_path / SHM_OP / "lock"
    baton.parent.mkdir()
    baton.touch()
    with caplog.at_level(logging.WARNING, logger="fne_dist"), jit_build_guard(SHM_OP):
        assert not baton.exists()
    assert str(baton) in caplog.text
    with jit_build_guard(SHM_OP):  # nothing stale: nothing said
        pass
    assert caplog.text.count("stale build lock") == 1


@pytest.mark.system
@pytest.mark.timeout(420)
def test_hostile_deepspeed_op_loads_past_a_stale_lock(tmp_path: Path) -> None:
    """Invariant: DeepSpeed's real JIT load of its CPU comm op, as ``build_engine`` runs it
    before ``deepspeed.initialize``, returns although a killed process left the build lock
    behind (the issue's repro: without the guard this waits forever)."""
    extensions = tmp_path / "ext"
    if (SHARED_EXTENSIONS / SHM_OP / f"{SHM_OP}.so").exists():  # built already: no compile
        shutil.copytree(SHARED_EXTENSIONS / SHM_OP, extensions / SHM_OP)
    (extensions / SHM_OP).mkdir(parents=True, exist_ok=True)
    (extensions / SHM_OP / "lock").touch()
    code = "from fne_dist.engine import preload_jit_ops\npreload_jit_ops()\nprint('loaded')\n"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # ninja
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    assert "stale build lock" in out.stdout + out.stderr
    assert not (extensions / SHM_OP / "lock").exists()
