"""Crafted files for the hostile-input tests, written byte by byte (no library would write them),
and ``measure``: how long each reader takes to refuse a file and how much memory it grows by,
measured in a fresh subprocess.

Memory is the growth of the subprocess's resident set: ``/proc/self/clear_refs`` resets the peak
(``VmHWM``) before each file, and the growth is the peak during the call minus the resident set
just before it (after one small valid file of each format, so that what the libraries set up on
first use is not counted). RSS rather than tracemalloc because numpy, pyarrow and zlib allocate outside
Python's allocator. Where the peak cannot be reset, each file gets its own subprocess and the
growth is the process's lifetime peak minus the resident set before the call (an overestimate).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 1 << 20

# ---------------------------------------------------------------- CRC-32 of repeated data (zlib's crc32_combine)

_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2nmodp(n: int, k: int) -> int:
    table = [1 << 30]
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    p = 1 << 31
    while n:
        if n & 1:
            p = _multmodp(table[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)``."""
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ crc2


def crc32_repeated(block: bytes, times: int) -> int:
    """``zlib.crc32(block * times)`` without building it."""
    crc, length = 0, 0
    unit_crc, unit_len = zlib.crc32(block), len(block)
    while times:
        if times & 1:
            crc, length = crc32_combine(crc, unit_crc, unit_len), length + unit_len
        unit_crc, unit_len = crc32_combine(unit_crc, unit_crc, unit_len), unit_len * 2
        times >>= 1
    return crc


# ---------------------------------------------------------------- raw zip archives


def deflate_bomb(total: int, byte: bytes = b" ", prefix: bytes = b"") -> tuple[bytes, int]:
    """(raw deflate data, CRC-32) of ``prefix`` then ``byte`` repeated up to ``total`` bytes in all,
    built from one compressed 1 MiB block repeated (a full flush makes every block's output the same)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH) if prefix else b""
    block = byte * BLOCK
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(total - len(prefix), BLOCK)
    tail = c.compress(byte * rest) + c.flush()
    data = head + first + again * (n - 1) + tail
    crc = crc32_combine(
        crc32_combine(zlib.crc32(prefix), crc32_repeated(block, n), n * BLOCK), zlib.crc32(byte * rest), rest
    )
    return data, crc


def zip_raw(entries: list[tuple[str, bytes, int, int, int]], *, count: int | None = None) -> bytes:
    """A zip archive of ``(name, stored bytes, method (0 stored, 8 deflated), unpacked size, crc)``;
    ``count`` overrides the entry count the end record declares."""
    out, central = bytearray(), bytearray()
    for name, data, method, size, crc in entries:
        raw_name = name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), size, len(raw_name), 0)
        out += raw_name + data
        central += struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            20,
            20,
            0,
            method,
            0,
            0,
            crc,
            len(data),
            size,
            len(raw_name),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += raw_name
    n = len(entries) if count is None else count
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), len(out), 0)
    return bytes(out + central + end)


def zip_many_entries(entries: int, *, declare: int | None = None, zip64: bool | None = None) -> bytes:
    """``entries`` central directory records of one empty member ``a.npy`` (each about 50 bytes: a
    tiny upload that costs ``zipfile.ZipFile`` a ``ZipInfo`` per record). The end record declares
    ``declare`` entries (default: the truth); ``zip64`` adds a zip64 end record declaring them
    (default: when they are more than 65,535)."""
    name = b"a.npy"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
    record = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0)
    central = (record + name) * entries
    n = entries if declare is None else declare
    zip64 = n > 0xFFFF if zip64 is None else zip64
    tail = b""
    if zip64:
        at = len(local) + len(central)
        tail += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(central), len(local))
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
        n = 0xFFFF
    size = len(central) if not zip64 else 0xFFFFFFFF
    tail += struct.pack(
        "<4s4H2LH",
        b"PK\x05\x06",
        0,
        0,
        min(n, 0xFFFF),
        min(n, 0xFFFF),
        size,
        len(local) if not zip64 else 0xFFFFFFFF,
        0,
    )
    return local + central + tail


# ---------------------------------------------------------------- the crafted dataset files


def npy_header(shape: tuple[int, ...], descr: str = "<f8", version: int = 1, length: int | None = None) -> bytes:
    """A .npy header for ``shape`` (any integers, negative ones too); ``length`` overrides its declared length."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    size = len(text) if length is None else length
    width = "<H" if version == 1 else "<I"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(width, size) + text


def npz_negative_shape() -> bytes:
    """An npz whose array claims shape (-1, -1): one value, and a shape no array can have."""
    data = npy_header((-1, -1)) + struct.pack("<d", 1.0)
    return zip_raw([("x.npy", data, 0, len(data), zlib.crc32(data))])


def npz_huge_header(total: int = 4 * 1024**3 - BLOCK) -> bytes:
    """An npz whose one member (version 2.0) declares a header of ``total`` bytes, and holds one: a
    few MB of deflate that numpy's parser would read whole before checking its length."""
    magic = b"\x93NUMPY\x02\x00" + struct.pack("<I", total - 12)
    data, crc = deflate_bomb(total, b" ", prefix=magic)
    return zip_raw([("x.npy", data, 8, total, crc)])


def csv_wide_header(columns: int) -> bytes:
    """A header row of ``columns`` distinct names, then one row of zeros."""
    return (",".join(f"c{i}" for i in range(columns)) + "\n" + ",".join("0" * columns) + "\n").encode()


def parquet_wide(rows: int = 65536, columns: int = 4096) -> bytes:
    """``rows`` x ``columns`` int64 zeros (2 GiB decoded, 2 MB on disk: dictionary-encoded), with a
    null in the first row of the first column, so a reader refuses it in its first batch."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    zeros = pa.array(np.zeros(rows, dtype=np.int64))  # one buffer, shared by every column
    first = pa.array([None] + [0] * (rows - 1), type=pa.int64())
    table = pa.table([first] + [zeros] * (columns - 1), names=[f"c{i}" for i in range(columns)])
    buf = io.BytesIO()
    pq.write_table(table, buf, store_schema=False)
    return buf.getvalue()


def safetensors_deep(depth: int = 100_000) -> bytes:
    """A safetensors file whose header nests ``depth`` lists deep (json.loads: RecursionError)."""
    head = b'{"x":' + b"[" * depth + b"]" * depth + b"}"
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


# ---------------------------------------------------------------- the crafted .pt2 archives


def pt2_raw(model_json: tuple[bytes, int, int, int] | bytes, *, extra: list | None = None) -> bytes:
    """A .pt2-shaped archive (archive_format, byteorder, models/model.json) by hand: ``model_json``
    is the stored bytes, or ``(raw deflate, method, unpacked size, crc)``."""
    if isinstance(model_json, bytes):
        model = ("archive/models/model.json", model_json, 0, len(model_json), zlib.crc32(model_json))
    else:
        data, method, size, crc = model_json
        model = ("archive/models/model.json", data, method, size, crc)
    fixed = [
        (f"archive/{n}", v, 0, len(v), zlib.crc32(v)) for n, v in (("archive_format", b"pt2"), ("byteorder", b"little"))
    ]
    return zip_raw([*fixed, model, *(extra or [])])


def pt2_bomb(total: int = 4 * 1024**3 - BLOCK) -> bytes:
    """models/model.json deflates from about 4 MB to ``total`` bytes (declared honestly)."""
    data, crc = deflate_bomb(total, b" ", prefix=b'{"schema_version": ')
    return pt2_raw((data, 8, total, crc))


def pt2_lying_bomb(total: int = 4 * 1024**3 - BLOCK) -> bytes:
    """models/model.json declares 100 bytes but its deflate stream runs to ``total``."""
    data, crc = deflate_bomb(total, b" ", prefix=b"{")
    return pt2_raw((data, 8, 100, crc))


def pt2_deep(depth: int = 100_000) -> bytes:
    """models/model.json nested ``depth`` lists deep."""
    return pt2_raw(b"[" * depth + b"]" * depth)


def pt2_many_entries(entries: int) -> bytes:
    return zip_many_entries(entries)


# ---------------------------------------------------------------- measuring a reader in a subprocess

_SCRIPT = r"""
import gc, json, pathlib, resource, sys, time
import numpy, pyarrow, pyarrow.parquet, zipfile, zlib  # imported before measuring: not the reader's cost
from service.exported_files import describe_program, read_pt2
from service.formats import REGISTRY

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def run(kind, path):
    if kind == "pt2":
        describe_program(read_pt2(path, max_bytes=4 * 1024**3))
    else:
        REGISTRY[kind].inspect(pathlib.Path(path), 4 * 1024**3)

def warm_up():
    # One small valid file per format first: what a library sets up on first use (pyarrow's pools,
    # numpy's header parser) is not the crafted file's cost.
    import io, tempfile
    import numpy as np, pyarrow as pa
    d = pathlib.Path(tempfile.mkdtemp())
    pyarrow.parquet.write_table(pa.table({"a": np.arange(10)}), d / "w.parquet")
    np.savez(d / "w.npz", a=np.arange(10))
    (d / "w.csv").write_text("a,b\n1,2\n")
    head = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (d / "w.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"\0" * 4)
    for fmt in ("parquet", "npz", "csv", "safetensors"):
        REGISTRY[fmt].inspect(d / f"w.{fmt}", 1 << 30)

warm_up()
out = []
for kind, path in json.loads(sys.argv[1]):
    gc.collect()
    exact = reset_peak()
    before = status("VmRSS")
    t = time.perf_counter()
    try:
        run(kind, path)
        error = None
    except BaseException as exc:
        error = [type(exc).__name__, str(exc)]
    seconds = time.perf_counter() - t
    peak = status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.append({"seconds": seconds, "growth": max(0, peak - before), "error": error, "exact": exact})
print(json.dumps(out))
"""


def _run(cases: list[tuple[str, str]], root: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(cases: list[tuple[str, Path]], root: Path = ROOT) -> list[dict]:
    """``{"seconds", "growth" (bytes), "error": [type, message] | None, "exact"}`` per ``(reader, file)``:
    the reader is a dataset format's name or ``"pt2"`` (read_pt2 then describe_program)."""
    pairs = [(kind, str(path)) for kind, path in cases]
    results = _run(pairs, root)
    if all(r["exact"] for r in results):
        return results
    return [_run([pair], root)[0] for pair in pairs]  # no peak reset here: one process per file
