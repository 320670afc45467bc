"""fne_dist: distributed image-text matching with False Negative Elimination (FNE).

The algorithm lives in :mod:`fne_dist.fne` as pure tensor functions; everything that knows about
ranks, launchers or devices lives elsewhere.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that wait sleep instead of spinning (a user's OMP_WAIT_POLICY wins). Read once,
# when torch loads libgomp: this must run before torch is imported, which it does for every
# `python -m fne_dist...` process (torchrun, Slurm; a local Ray passes it to its workers). With
# libgomp's default (300,000 spins before sleeping) a waiting thread holds a core that the ranks,
# loader workers and the other intra-op thread share: on 2 busy cores a 64×384 @ 384×1536 matmul
# took 11-16 ms with 2 threads against 0.9 ms with 1, and 1.2 ms with 2 passive ones
# (docs/benchmarks.md, "Scaling"). Results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
