"""Tools apart from the library: the ``tokred`` command and what only it and the benchmarks use.

- :mod:`tokred.tools.cli`: the ``tokred`` command (``python -m tokred`` runs it too).
- :mod:`tokred.tools.demo`: ``tokred demo``, token merging on MiniLM (needs the ``bench`` extras).
- :mod:`tokred.tools.models`: model specs (``minilm``, ``timm:``, ``hf:``, ``FILE.py:FACTORY``).
- :mod:`tokred.tools.offline`: real causal LMs and Wikipedia text from offline PyPI packages.

The top layer (ARCHITECTURE.md): tools import the library; nothing in the library imports tools.
"""
