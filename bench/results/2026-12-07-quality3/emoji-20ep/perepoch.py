"""bench/quality.py with every epoch's diagnostics printed (the rule's choice over training):
run from the repository root as ``python .../perepoch.py <bench/quality.py arguments>``."""

import sys
from pathlib import Path

from fne_dist import run_summary

KEYS = ("frac_tail_intra", "fn_pfn_precision", "fn_pfn_recall", "prior_intra", "mu_fn_intra",
        "sigma_fn_intra")  # fmt: skip
_close = run_summary.EpochDiagnostics.close_epoch


def close_epoch(self: run_summary.EpochDiagnostics, epoch: int) -> dict:
    row = _close(self, epoch)
    print("EPOCH", epoch, {k: round(float(row[k]), 3) for k in KEYS if k in row}, flush=True)
    return row


if __name__ == "__main__":
    run_summary.EpochDiagnostics.close_epoch = close_epoch  # quality.py imports the class
    sys.path.insert(0, str(Path.cwd() / "bench"))
    import quality

    quality.main(sys.argv[1:])
