"""Chunked datasets, as the README shows them: a dask array in and out with locality, and
h5py's habits.  Starts its own local cluster of worker processes and a fabric in it."""

from __future__ import annotations

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

import datafabric


def fill_rows(ds: datafabric.Dataset, start: int) -> None:
    """A writer task: any number of them, on any workers, until the seal."""
    ds[start : start + 100] = np.arange(start, start + 100)[:, None]


def main() -> None:
    with LocalCluster(n_workers=2, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=256)

        # dask.array in and out: each chunk stored by the worker that computed it, and
        # read by tasks on a worker of the node holding it, as a zero-copy view
        field = da.random.default_rng(0).random((2000, 1000), chunks=(500, 500))
        ds = fabric.from_dask("run1/field", field, doc="a random field", attrs={"unit": "K"})
        total = ds.to_dask().sum().compute()
        print("same sum", np.isclose(total, field.sum().compute()))

        # h5py's habits: create, write from tasks, seal, slice
        with fabric.create_dataset("run1/grid", (400, 300), "f8", chunks=(100, 100), fillvalue=-1) as grid:
            client.gather([client.submit(fill_rows, grid, start) for start in (0, 100, 300)])
        print("row 150", grid[150, :3], "row 250", grid[250, :3])  # rows 200-299 were never written
        print("names", sorted(fabric), "run1/grid" in fabric, fabric["run1/field"].shape)
        corner = grid[10:20, 5:8]  # inside one chunk: a zero-copy view
        print("zero-copy", not corner.flags.owndata, "strided", grid[::100, ::-150].tolist())
        del fabric["run1/grid"]
        fabric.shutdown()


if __name__ == "__main__":
    main()
