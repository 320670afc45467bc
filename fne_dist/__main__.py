"""``python -m fne_dist COMMAND ...``: the same as the ``fne-dist`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
