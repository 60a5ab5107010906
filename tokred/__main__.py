"""``python -m tokred``: the same as the ``tokred`` command."""

import sys

from tokred.cli import main

sys.exit(main())
