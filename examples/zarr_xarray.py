"""zarr and xarray over the fabric, as the README shows them: datasets read by
``xarray.open_zarr`` and ``zarr.open_array``, and a zarr array written into a new
dataset.  Starts its own local cluster of worker processes and a fabric in it."""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr
from distributed import Client, LocalCluster

import datafabric
from datafabric.zarr import FabricStore


def main() -> None:
    with LocalCluster(n_workers=2, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=256)

        # datasets under "sim/" are the variables of one zarr group; xarray's dimension
        # names come from the _ARRAY_DIMENSIONS attr
        days = np.arange(365)
        temps = 280 + 10 * np.sin(2 * np.pi * days / 365) + np.arange(4)[:, None]
        fabric.create_dataset(
            "sim/temperature",
            data=temps,
            chunks=(4, 100),
            attrs={"_ARRAY_DIMENSIONS": ["station", "day"], "units": "K"},
        )
        fabric.create_dataset("sim/day", data=days, attrs={"_ARRAY_DIMENSIONS": ["day"]})
        ds = xr.open_zarr(FabricStore(fabric, prefix="sim"))
        print("dims", dict(ds.sizes), "units", ds["temperature"].attrs["units"])
        print("station means", ds["temperature"].mean("day").values.round(1).tolist())

        # zarr writes a new dataset: uncompressed, each chunk whole and once; close() seals
        with FabricStore(fabric) as store:
            z = zarr.create_array(store=store, name="sim/anomaly", shape=temps.shape, chunks=(4, 100),
                                  dtype="f8", compressors=None, dimension_names=["station", "day"])  # fmt: skip
            for start in range(0, 365, 100):
                z[:, start : start + 100] = temps[:, start : start + 100] - temps.mean()
        print(
            "sealed",
            fabric.dataset("sim/anomaly").sealed,
            "variables",
            sorted(xr.open_zarr(store, group="sim").variables),
        )
        print("exact", np.array_equal(zarr.open_array(store=store, path="sim/anomaly")[:], temps - temps.mean()))


if __name__ == "__main__":
    main()
