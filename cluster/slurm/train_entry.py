"""``python -m fne_dist.train`` as a script path, for launchers that take a file, not a module
(DeepSpeed's multi-node runners drop ``--module``)."""

import sys
from pathlib import Path

# Run from a checkout without installing: the repository root is two levels up.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fne_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
