"""Bounds checked before a reader does any work whose cost the file sets: zip directories, zip
members and JSON documents.

* ``zip_directory(path, max_entries)``: reads the end-of-central-directory record (and the zip64
  one) and walks the central directory's fixed-size records, so an archive with too many entries
  or an oversized directory is refused *before* ``zipfile.ZipFile`` builds one ``ZipInfo`` per
  entry (a 1 GiB archive of empty entries made ``ZipFile()`` hold about 5 GB).
* ``read_member(zf, name, cap)``: a member's bytes, read in chunks, refused when its declared or its
  actual (decompressed) size passes ``cap``: a member that deflates from megabytes to gigabytes
  is never read whole.
* ``check_json(raw, max_depth, max_tokens)``: a scan of the brackets, commas and strings outside
  strings, so a document nested thousands deep (``json.loads`` would raise ``RecursionError``) or
  made of millions of tiny values (hundreds of bytes of Python objects per byte of JSON) is
  refused before it is parsed.

Every refusal raises ``LimitError`` (a ``ValueError``) with a sentence and a short code; each reader
turns it into its own error type (``DatasetFileError``, ``ExportedProgramError``).
"""

from __future__ import annotations

import lzma
import re
import struct
import zipfile
import zlib
from pathlib import Path

MAX_JSON_DEPTH = 64  # brackets open at once; real headers and programs nest about 10 deep
MAX_JSON_TOKENS = 1_000_000  # strings, brackets and commas; a 60-node model.json has about 11,000
MEMBER_CHUNK = 1 << 20
# What zipfile raises for a corrupt archive or member (bad headers, CRC, deflate, bz2 or lzma data,
# unknown compression, encryption, names that are not UTF-8).
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    EOFError,
    OSError,
    NotImplementedError,
    ValueError,
    RuntimeError,
)

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory (22 bytes, then the comment)
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes, just before the end record
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # 56 bytes, just before the locator
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # one central directory record (46 bytes, then 3 fields)


class LimitError(ValueError):
    """A file past a bound (or too malformed to measure). ``str()`` is a sentence; ``code`` a short type."""

    def __init__(self, message: str, code: str = "corrupt") -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- zip directories


def _end_record(f, size: int) -> tuple[int, tuple] | None:
    """(offset, fields) of the end-of-central-directory record, found as ``zipfile`` finds it."""
    if size < _EOCD.size:
        return None
    f.seek(size - _EOCD.size)
    tail = f.read(_EOCD.size)
    if tail[:4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        return size - _EOCD.size, _EOCD.unpack(tail)
    start = max(0, size - _EOCD.size - 0xFFFF)
    f.seek(start)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    return start + at, _EOCD.unpack(tail[at : at + _EOCD.size])


def _zip64(f, at: int) -> tuple[int, int] | None:
    """(entries, directory size) of the zip64 end record before offset ``at``, or None."""
    if at < _EOCD64_LOCATOR.size + _EOCD64.size:
        return None
    f.seek(at - _EOCD64_LOCATOR.size - _EOCD64.size)
    data = f.read(_EOCD64.size + _EOCD64_LOCATOR.size)
    sig, disk, _offset, disks = _EOCD64_LOCATOR.unpack(data[_EOCD64.size :])
    if sig != b"PK\x06\x07":
        return None
    if disk != 0 or disks > 1:
        return None  # zipfile refuses it
    fields = _EOCD64.unpack(data[: _EOCD64.size])
    if fields[0] != b"PK\x06\x06":
        return None
    return max(fields[6], fields[7]), fields[8]


def zip_directory(
    path: Path, max_entries: int, what: str = "the archive", max_directory_bytes: int | None = None
) -> None:
    """``LimitError`` when the zip archive at ``path`` has more than ``max_entries`` entries (as
    its end record declares them, or as its central directory's records count them) or a central
    directory over ``max_directory_bytes`` (default: 1 KiB per allowed entry); ``what`` names the
    archive in the sentence. Reads the end record and the directory only.

    A file that is not a zip, or a directory that is corrupt, passes: ``zipfile`` then refuses it
    in its own words, having read at most the capped directory.
    """
    cap = max_directory_bytes if max_directory_bytes is not None else max_entries * 1024
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        found = _end_record(f, size)
        if found is None:
            return
        at, end = found
        entries, cd_size = max(end[3], end[4]), end[5]
        start = at - cd_size
        z64 = _zip64(f, at)
        if z64 is not None:
            entries, cd_size = z64
            start = at - cd_size - _EOCD64.size - _EOCD64_LOCATOR.size
        if entries > max_entries:
            raise LimitError(f"{what} has {entries} entries; at most {max_entries} are accepted", "too_many_entries")
        if cd_size > cap:
            raise LimitError(
                f"{what}'s central directory is {cd_size} bytes, above the limit of {cap} bytes "
                f"({max_entries} entries)",
                "too_many_entries",
            )
        if start >= 0:
            f.seek(start)
            _count_records(f.read(cd_size), max_entries, what)


def _count_records(directory: bytes, max_entries: int, what: str) -> None:
    """Walk a central directory's records as ``zipfile`` does, refusing one past the cap."""
    pos = count = 0
    while pos < len(directory):
        if len(directory) - pos < _CENTRAL.size or directory[pos : pos + 4] != b"PK\x01\x02":
            return  # zipfile stops here too, with BadZipFile
        rec = _CENTRAL.unpack_from(directory, pos)
        pos += _CENTRAL.size + rec[12] + rec[13] + rec[14]
        count += 1
        if count > max_entries:
            raise LimitError(
                f"{what} has more than {max_entries} entries; at most {max_entries} are accepted",
                "too_many_entries",
            )


def read_member(zf: zipfile.ZipFile, name: str, cap: int, what: str | None = None) -> bytes:
    """The bytes of member ``name`` (``KeyError`` if absent), read in chunks; ``LimitError`` when its
    declared or its actual decompressed size is over ``cap`` (``what`` names it: default its name)."""
    what = what or name
    info = zf.getinfo(name)
    if info.file_size > cap:
        raise LimitError(f"{what} is {info.file_size} bytes once unpacked, above the limit of {cap} bytes", "too_large")
    parts, total = [], 0
    with zf.open(info) as fp:
        while chunk := fp.read(min(MEMBER_CHUNK, cap + 1 - total)):
            total += len(chunk)
            if total > cap:
                raise LimitError(f"{what} unpacks to more than its limit of {cap} bytes", "too_large")
            parts.append(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------- JSON


# A string (possibly unterminated: it then runs to the end, so no start is tried twice), or one
# structural character. Numbers, literals and whitespace are skipped by the regex engine.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)|[\[\]{},]', re.S)


def check_json(raw: bytes, what: str, max_depth: int = MAX_JSON_DEPTH, max_tokens: int = MAX_JSON_TOKENS) -> None:
    """``LimitError`` when the JSON text ``raw`` (``what`` names it in the sentence) nests deeper
    than ``max_depth`` or holds more than ``max_tokens`` strings, brackets and commas. Says nothing
    about whether it is valid JSON: ``json.loads`` decides that after."""
    depth = tokens = 0
    for m in _JSON_TOKEN.finditer(raw):
        tokens += 1
        if tokens > max_tokens:
            raise LimitError(f"{what} holds more than {max_tokens} JSON values", "too_complex")
        c = raw[m.start()]
        if c in b"[{":
            depth += 1
            if depth > max_depth:
                raise LimitError(f"{what} nests more than {max_depth} levels deep", "too_complex")
        elif c in b"]}":
            depth -= 1
