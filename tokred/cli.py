"""Deprecated alias of :mod:`tokred.tools.cli`, where the ``tokred`` command moved. Kept because
installs made before the move run ``tokred.cli:main`` from their ``tokred`` script (pyproject.toml
now names ``tokred.tools.cli:main``; reinstalling, e.g. scripts/setup_env.sh, updates the script)."""

import warnings

from tokred.tools.cli import main, parse_option_args  # noqa: F401

warnings.warn("tokred.cli moved to tokred.tools.cli (the tokred command's entry point is "
              "tokred.tools.cli:main)", DeprecationWarning, stacklevel=2)
