"""Deprecated alias of :mod:`tokred.tools.cli`, where the ``tokred`` command moved. Kept because
installs made before the move run ``tokred.cli:main`` from their ``tokred`` script (pyproject.toml
now names ``tokred.tools.cli:main``; reinstalling, e.g. scripts/setup_env.sh, updates the script)."""

import warnings

from tokred.tools.cli import main, parse_option_args  # noqa: F401

warnings.warn("tokred.cli moved to tokred.tools.cli; a tokred script that imports tokred.cli was installed "
              "before the move: reinstall tokred (scripts/setup_env.sh) to update it", DeprecationWarning,
              stacklevel=2)
