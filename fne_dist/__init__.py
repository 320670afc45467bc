"""fne_dist: distributed image-text matching with False Negative Elimination (FNE).

The algorithm lives in :mod:`fne_dist.fne` as pure tensor functions; everything that knows about
ranks, launchers or devices lives elsewhere.
"""

__version__ = "0.1.0"
