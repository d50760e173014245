"""``python -m dynconvert``: the command line (also what ``torchrun -m dynconvert`` starts)."""

import sys

from dynconvert.cli import main

sys.exit(main())
