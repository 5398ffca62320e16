"""Dataset files for the tests, written with the formats' own libraries (safetensors, numpy,
pyarrow) so that what the service accepts is what those libraries produce."""

from __future__ import annotations

import io
import json
import struct

import numpy as np


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(dict(tensors))


def safetensors_raw(entries: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """A safetensors file by hand (for dtypes numpy lacks, e.g. BF16): (name, dtype, shape, data)."""
    header, data, offset = {}, b"", 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def npz_bytes(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def parquet_bytes(columns: dict, schema=None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def csv_bytes(header: list[str], rows: list[list]) -> bytes:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def blobs(n_rows: int = 40, features: int = 3, classes: int = 3, seed: int = 0):
    """A small classification problem: x (n, features) float32, y (n,) int64 labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_rows) % classes
    x = rng.normal(size=(n_rows, features)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y.astype(np.int64)
