"""TODO docstring: raydist.storage."""

from __future__ import annotations

import os


def is_uri(path: str) -> bool:
    return "://" in path


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` (local or URI) so that a reader sees the old file or the whole new one: a
    local file is written beside it and renamed over it; an object store (s3://, gs://) makes an object
    visible only when its upload completes."""
    if "://" in path:
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
