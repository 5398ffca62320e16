"""Dataset file formats: one module per format, each a ``DatasetFormat`` (service/formats/base.py).

``REGISTRY`` maps a format's name (what the database stores, ``schemas.DatasetFormat``) to its
reader; ``BY_SUFFIX`` maps a file extension to the format's name. service/dataset_files.py picks
a reader here for the API and the worker. Nothing here trusts the file: no pickle, no code, no
network; numpy and pyarrow are imported only inside the functions that need them.
"""

from __future__ import annotations

from service.formats import csv, npz, parquet, safetensors
from service.formats.base import DatasetFileError, DatasetFormat

__all__ = ["BY_SUFFIX", "REGISTRY", "DatasetFileError", "DatasetFormat"]

# In the order messages list them.
REGISTRY: dict[str, DatasetFormat] = {f.name: f for f in (safetensors.FORMAT, npz.FORMAT, csv.FORMAT, parquet.FORMAT)}
BY_SUFFIX: dict[str, str] = {suffix: f.name for f in REGISTRY.values() for suffix in f.suffixes}
