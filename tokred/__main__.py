"""``python -m tokred``: the same as the ``tokred`` command (tokred.tools.cli)."""

import sys

from tokred.tools.cli import main

sys.exit(main())
