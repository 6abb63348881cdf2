"""Whole arrays between files and the fabric: HDF5 datasets, zarr arrays and .npy files
imported as fabric datasets, and datasets or variables exported to them.

sources.py  the files an import reads: layout, attributes, reads into given memory
imports.py  ``import_file``: a file into a sealed dataset, chunk by chunk, one copy
exports.py  ``export_file``: a dataset or a variable into a file, under a temporary name
"""

from datafabric.files.exports import export_file, exported
from datafabric.files.imports import import_file

__all__ = ["export_file", "exported", "import_file"]
