"""Paths that may be local or remote (s3://, gs://, file://), one way: every file raydist reads or writes
outside a worker's memory goes through pyarrow's filesystems, here.

    fs, inner = filesystem("s3://bucket/runs/x")    # (pyarrow filesystem, path inside it)
    data = read_bytes("runs/x/config.yaml")         # a local path or a URI
    write_atomically("runs/x/config.yaml", b"...")  # a reader sees the old file or the whole new one
"""

from __future__ import annotations

import os
from typing import Optional


def is_uri(path: str) -> bool:
    """A remote or scheme-qualified location (s3://..., gs://..., file://...), not a plain local path."""
    return "://" in path


def filesystem(path: str):
    """(pyarrow filesystem, the path inside it) for a local path (made absolute, ~ expanded) or a URI."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def read_bytes(path: str) -> Optional[bytes]:
    """The whole file at `path` (local or URI), or None when there is no file there."""
    import pyarrow.fs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as fh:
        return fh.read()


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` (local or URI) so that a reader sees the old file or the whole new one: a
    local file is written beside it and renamed over it; an object store (s3://, gs://) makes an object
    visible only when its upload completes."""
    if is_uri(path):
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        if not isinstance(fs, pyarrow.fs.LocalFileSystem):
            with fs.open_output_stream(inner) as out:
                out.write(data)
            return
        path = inner
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
