"""Storage on any pyarrow.fs URI (a local directory, s3://, gs://, hdfs://) with whole-object writes.

Local renames are atomic. Object stores have no rename, but a single PUT is all-or-nothing, so a
reader of one object sees the old bytes or the new ones. Multi-object commits (a registry
version) are made atomic one level up, by writing their manifest last.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def open_storage(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and root path for a local directory or any pyarrow.fs URI."""
    if "://" not in uri:
        uri = str(Path(uri).resolve())
    fs, root = pafs.FileSystem.from_uri(uri)
    return fs, root.rstrip("/")


def normal_uri(uri: str) -> str:
    """One spelling per location: local paths resolved, URIs as given."""
    return uri if "://" in uri else str(Path(uri).resolve())


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a file is at `path`."""
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of one file."""
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(fs: pafs.FileSystem, path: str) -> dict:
    """One JSON file."""
    return json.loads(read_bytes(fs, path))


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write next to the final name, then move over it: readers see old or new, never half."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    """Write one JSON file atomically."""
    write_bytes(fs, path, json.dumps(obj, indent=1, allow_nan=False).encode())
