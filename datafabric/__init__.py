"""datafabric: one typed, write-once copy of each array per machine, in POSIX shared
memory, found by name from any Dask worker or client."""

from datafabric import errors
from datafabric.datasets import Dataset
from datafabric.fabric import Fabric, Pointer
from datafabric.startup import connect, start

__all__ = ["Dataset", "Fabric", "Pointer", "connect", "errors", "start"]
