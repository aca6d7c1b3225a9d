"""``python -m qpass ...``: the ``qpass`` command line (qpass/cli.py)."""

import sys

from qpass.cli import main

sys.exit(main())
