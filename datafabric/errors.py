"""Every error the fabric raises, under one base class.

Each class also derives from the builtin a numpy/h5py user would catch for the same
mistake (``KeyError`` for a missing name, ``ValueError`` for a bad value, ``TypeError``
for a bad type), so existing ``except`` clauses keep working.  All of them pickle, so a
refusal raised by the YellowPages or a worker reaches the caller with its own class.
"""

from __future__ import annotations


class FabricError(Exception):
    """Base class of every datafabric error."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class NameExistsError(FabricError, ValueError):
    """A variable of that name exists already; variables are write-once."""


class NameNotFoundError(FabricError, KeyError):
    """No visible variable has that name."""


class InvalidNameError(FabricError, ValueError):
    """The name breaks the naming rules."""


class InvalidTypeError(FabricError, TypeError):
    """The type cannot be parsed, is abstract, or has no fixed in-memory layout."""


class TypeMismatchError(FabricError, ValueError):
    """The type's size does not match the buffer's size."""


class InvalidBufferError(FabricError, TypeError):
    """The object given as data is not a buffer, an mmap or an open binary file."""


class OutOfSpaceError(FabricError):
    """No block (or no tmpfs) has room for the request."""


class VariableUnavailableError(FabricError, LookupError):
    """Every copy of the variable is on a node with no live worker right now; it comes
    back when a worker of that node joins."""

    @classmethod
    def on_nodes(cls, name: str, nodes: list[str]) -> VariableUnavailableError:
        return cls(
            f"{name!r} is stored only on node(s) {sorted(set(nodes))}, which have no live worker now; "
            "it comes back when a worker of that node joins"
        )


class ReferenceGoneError(FabricError, LookupError):
    """A view that travelled as a reference (through Dask or pickle) names a variable whose
    memory is gone: it was deleted and no process held a view of it any more."""


class KeptViewLostError(FabricError, LookupError):
    """A view kept through a scheduler restart was declared after its variable's memory was
    freed or moved (another extent, or none, is at its location now): it holds no lease, and
    its bytes may change under it."""


class NotOnThisNodeError(FabricError, LookupError):
    """The memory asked for is not mapped on this process's node."""


class BlockInUseError(FabricError, RuntimeError):
    """The block still holds live variables or reservations."""


class BlockNotFoundError(FabricError, KeyError):
    """No block of that node and name is known to the fabric."""


class NoFabricError(FabricError, RuntimeError):
    """No fabric is running on the cluster (or it has been shut down)."""


class FabricRunningError(FabricError, RuntimeError):
    """A fabric runs on the cluster already; connect to it instead of starting one."""


class InvalidArgumentError(FabricError, ValueError, TypeError):
    """An argument other than a name, type or buffer is out of range or of the wrong
    kind; both builtins, since ``int("x")`` and ``None <= 0`` used to say which."""


class WorkerLostError(FabricError, ConnectionError):
    """A worker that a request needed (a block's owner, or the one running the task) died
    or left while serving it; what it owned is adopted by a peer of its node."""


class HolderAwayError(WorkerLostError):
    """The YellowPages counts the calling process gone: its stream to the scheduler broke.
    A client reconnects under its id (and a seal waits for that, ``writer.seal_all``);
    nothing of the refused request was done."""


class InvalidSelectionError(FabricError, IndexError):
    """A dataset selection is out of range or of a kind datasets do not take (ints,
    slices with steps, ``...`` and ``()`` are taken)."""


class DatasetWritingError(FabricError, RuntimeError):
    """The dataset is still being written: it is read once sealed."""


class DatasetSealedError(FabricError, PermissionError):
    """The dataset is sealed, and read-only from then on, like a variable."""


class ChunkWrittenError(FabricError, PermissionError):
    """A write-once write (a zarr store's) names a chunk that was written already."""


class WritesDisabledError(FabricError, PermissionError):
    """The HTTP API's write routes are off (the Dask config key ``datafabric.http.writable``)."""


class LeaseNotFoundError(FabricError, KeyError):
    """No HTTP lease of that id is held: it was released, or it lapsed."""


class FileFormatError(FabricError, ValueError):
    """A file to import is missing, is not what its name says, has no dataset at the inner
    path given (or several and none was given), or holds values a dataset cannot take."""


class OutputExistsError(FabricError, FileExistsError):
    """The file an export would write exists already: pass ``force`` to replace it."""
