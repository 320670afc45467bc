"""bench/quality.py with every epoch's diagnostics printed (the rule's choice over training)."""
import sys
sys.path.insert(0, "/work/wt/quality3/bench")
from fne_dist import run_summary
orig = run_summary.EpochDiagnostics.close_epoch
def close_epoch(self, epoch):
    row = orig(self, epoch)
    keys = ("frac_tail_intra", "fn_pfn_precision", "fn_pfn_recall", "prior_intra", "mu_fn_intra", "sigma_fn_intra")
    print("EPOCH", epoch, {k: round(float(row[k]), 3) for k in keys if k in row}, flush=True)
    return row
run_summary.EpochDiagnostics.close_epoch = close_epoch
import quality
quality.EpochDiagnostics.close_epoch = close_epoch
quality.main(sys.argv[1:])
