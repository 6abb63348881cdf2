"""The ``datafabric`` command: start a fabric, look into it and move data in and out of it
from a shell.

A fabric outlives the process that started it, so people need to reach it without
writing Python: start one on a running cluster or on this machine, see what it holds,
put files in, get variables out, and shut it down.  Every command is a thin layer over
the public ``Fabric`` API.

The command modules are imported here for what importing them does: each registers its
commands on the group of ``app``.
"""

from datafabric.cli import read, start, stop, transfer  # noqa: F401
from datafabric.cli.app import main

__all__ = ["main"]
