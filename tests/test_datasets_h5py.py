"""DosNa's compatibility test: one script, run against ``h5py.File`` and against the
fabric, gives the same results."""

from __future__ import annotations

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")


def script(f, seal):
    """h5py's API as the fabric shares it; ``seal`` ends a dataset's writing (a no-op
    for h5py, whose datasets stay writable)."""
    out = {}
    a = np.arange(24 * 10, dtype=np.float32).reshape(24, 10)
    f.create_dataset("a", data=a, chunks=(5, 4))
    b = f.create_dataset("b", (12, 9), "i4", chunks=(4, 4), fillvalue=-1)
    b[2:5, :] = 7
    b[::3, 1] = np.arange(4)
    b[-1, 2:9:3] = [1, 2, 3]
    b[6:10, 4:8] = np.arange(16).reshape(4, 4)
    seal(b)
    out["in"] = ["a" in f, "b" in f, "c" in f]
    out["names"] = sorted(f)
    out["len"] = len(f)
    for name in ("a", "b"):
        ds = f[name]
        out[name] = [ds.shape, ds.dtype, ds.chunks, ds.ndim, ds.size, len(ds)]
        out[name + " all"] = ds[...]
        out[name + " steps"] = ds[1:11:3, ::2]
        out[name + " int"] = ds[3]
        out[name + " point"] = ds[-2, 5]
        out[name + " ellipsis"] = ds[..., 1]
    out["fill"] = f["b"].fillvalue
    del f["a"]
    out["after del"] = sorted(f)
    return out


def test_the_same_script_gives_the_same_results_with_h5py_and_the_fabric(fabric, tmp_path):
    with h5py.File(tmp_path / "same.h5", "w") as f:
        expected = script(f, seal=lambda ds: None)
    got = script(fabric, seal=lambda ds: ds.seal())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
            assert got[key].dtype == value.dtype, key
        else:
            assert got[key] == value, key
    fabric.delete("b")
