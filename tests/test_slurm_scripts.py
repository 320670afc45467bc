"""What an admin reads and edits in cluster/slurm/*.sbatch, checked without running Slurm (the
scripts run for real in tests/test_cluster_slurm.py and tests/test_multinode_slurm.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "cluster" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
COMMON = (SLURM / "common.sh").read_text()


def directives(path: Path) -> list[str]:
    """The #SBATCH options sbatch reads: those before the first command line."""
    found = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH "):
            found.append(line.removeprefix("#SBATCH ").strip())
        elif line.strip() and not line.startswith("#"):
            break
    return found


def test_every_script_is_found() -> None:
    """Invariant: the four launch scripts exist (the tests below are not vacuous)."""
    assert {p.stem for p in SCRIPTS} == {"deepspeed", "ray", "srun", "torchrun"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_script_keeps_its_log_and_says_what_to_edit(path: Path) -> None:
    """Invariant: a requeued job appends to its log instead of truncating the first attempt's
    (--requeue with --open-mode=append), and the site-specific lines (account, partition:
    disabled as ##SBATCH; GPUs, CPUs, time) are in the header under an "Edit" note."""
    opts = directives(path)
    assert "--requeue" in opts and "--open-mode=append" in opts, opts
    text = path.read_text()
    assert "##SBATCH --account=" in text and "##SBATCH --partition=" in text
    assert text.index("# Edit for your site") < text.index("##SBATCH --account=")
    assert any(o.startswith(("--gpus-per-node=", "--gpus-per-task=")) for o in opts), opts
    assert any(o.startswith("--cpus-per-task=") for o in opts), opts


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.stem != "ray"], ids=lambda p: p.stem)
def test_training_step_is_preemptible_and_node_addressed(path: Path) -> None:
    """Invariant: each non-Ray script asks Slurm for USR1 well before the time limit
    (--signal=B:USR1@N, N >= 60 s: the trap in common.sh needs the batch shell to get it),
    runs its srun step through run_step (so the trap fires during the step and the job
    requeues itself) and through node.sh (each node's ranks bind its NodeAddr), and passes
    the Prometheus targets file before the user's overrides (which may replace it)."""
    opts = directives(path)
    signal = [o for o in opts if o.startswith("--signal=")]
    assert len(signal) == 1 and re.fullmatch(r"--signal=B:USR1@(\d+)", signal[0]), opts
    assert int(signal[0].split("@")[1]) >= 60
    text = path.read_text()
    sruns = [ln for ln in text.splitlines() if re.search(r"\bsrun\b", ln) and "#" not in ln[:1]]
    assert sruns and all(ln.startswith("run_step srun ") for ln in sruns), sruns
    assert all('bash "$NODE_SH"' in ln for ln in sruns), sruns
    assert '"${MONITOR_ARGS[@]}" \\\n  "${EXTRA[@]}"' in text or (
        '"${MONITOR_ARGS[@]}" "${EXTRA[@]}"' in text
    )


def test_common_sets_srun_cpus_and_site_hook_before_any_launch() -> None:
    """Invariant: common.sh (sourced by every script before its first srun) exports
    SRUN_CPUS_PER_TASK from the job's --cpus-per-task (srun stopped inheriting it in Slurm
    22.05), sources FNE_ENV_SETUP before it picks the interpreter, takes the config as the
    first argument, and traps USR1."""
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in COMMON
    assert COMMON.index('source "$FNE_ENV_SETUP"') < COMMON.index("PY=${FNE_PYTHON")
    assert "CONFIG=${1:-${FNE_CONFIG:-}}" in COMMON
    assert "trap 'preempt USR1' USR1" in COMMON
    for path in SCRIPTS:
        text = path.read_text()
        sourced = text.index('source "${SLURM_SUBMIT_DIR:-.}/cluster/slurm/common.sh"')
        first_srun = min(m.start() for m in re.finditer(r"^(run_step )?srun ", text, re.M))
        assert sourced < first_srun, path.name


def test_shipped_prometheus_config_reads_where_the_scripts_write() -> None:
    """Invariant: the shipped prometheus.yml's "fne" job reads targets/*.json and its "ray"
    job targets/ray/*.json (relative to the config, i.e. cluster/prometheus/targets/), the
    directory common.sh defaults FNE_PROM_TARGETS to and under which ray.sbatch copies Ray's
    discovery file; Ray's default temp dir stays for a Ray cluster started by hand."""
    cfg = yaml.safe_load((ROOT / "cluster" / "prometheus" / "prometheus.yml").read_text())
    files = {
        job["job_name"]: [f for sd in job.get("file_sd_configs", []) for f in sd["files"]]
        for job in cfg["scrape_configs"]
    }
    assert files["fne"] == ["targets/*.json"]
    assert files["ray"] == ["targets/ray/*.json", "/tmp/ray/prom_metrics_service_discovery.json"]
    assert "FNE_PROM_TARGETS-$PWD/cluster/prometheus/targets}" in COMMON
    assert "fne-${SLURM_JOB_ID}.json" in COMMON
    ray = (SLURM / "ray.sbatch").read_text()
    assert "$PROM_TARGETS/ray/$SLURM_JOB_ID.json" in ray
    assert '"$TMP/prom_metrics_service_discovery.json"' in ray
