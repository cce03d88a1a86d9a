"""Workdir files on a local disk or in an object store (gs://, s3://, az://), through etils.epath.

A TPU pod's hosts share one workdir in a bucket: orbax writes checkpoints there natively, and the
trainer's own files (config.json, vocab/, metrics.jsonl, TensorBoard events, VQ sample grids) go
through this module, so a bucket URL is never taken for a relative local path
(`os.path.abspath("gs://b/run")` is `./gs:/b/run`). epath reaches buckets through fsspec (gcsfs
for gs://: `pip install -e '.[gcs]'`).

Object stores cannot append to an object, so an appendable file (metrics.jsonl, an event file) is
kept in memory and uploaded whole when flushed; `MetricsLogger` flushes a remote workdir at most
every `REMOTE_FLUSH_SECONDS` and whenever a checkpoint is saved, so a resumed run never lacks a
record before its checkpoint.
"""
from __future__ import annotations

import io
import json
import os
import threading

import numpy as np
from etils import epath

REMOTE_SCHEMES = ("gs", "s3", "az")
_FSSPEC_PROTOCOL = {"gs": "gcs", "s3": "s3", "az": "az"}
_INSTALL_HINT = {"gs": "gcsfs (pip install -e '.[gcs]')", "s3": "s3fs (pip install -e '.[s3]')",
                 "az": "adlfs (pip install -e '.[az]')"}
REMOTE_FLUSH_SECONDS = 30.0


def scheme(path: str | os.PathLike) -> str | None:
    """'gs' for gs://..., None for a local path; any other URL is a ValueError, up front."""
    text = os.fspath(path)
    if "://" not in text:
        return None
    name = text.split("://", 1)[0]
    if name not in REMOTE_SCHEMES:
        raise ValueError(f"{text!r}: only local paths and {', '.join(s + '://' for s in REMOTE_SCHEMES)} URLs "
                         "are supported")
    return name


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) is not None


def _local_abspath(path: str | os.PathLike) -> str:
    """`~` expanded first: the shell leaves it in `--workdir=~/run`, and a run would then write to
    a directory named `~` under the current one."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path (`~` expanded), or the URL unchanged (what `os.path.abspath` would
    have mangled)."""
    return os.fspath(path) if is_remote(path) else _local_abspath(path)


def check_backend(path: str | os.PathLike) -> None:
    """Fails now, naming the package to install, rather than at the first write hours later."""
    name = scheme(path)
    if name is None:
        return
    import fsspec
    try:
        fsspec.get_filesystem_class(_FSSPEC_PROTOCOL[name])
    except (ImportError, ValueError) as e:
        raise ImportError(f"{os.fspath(path)!r} needs the fsspec backend for {name}://: install "
                          f"{_INSTALL_HINT[name]} ({e})") from None


def require_local(path: str | os.PathLike, what: str) -> str:
    """The absolute local path (`~` expanded), or a ValueError naming `what`: data directories are read by
    ArrayRecord and ScaNN, which open local files only (mount a bucket to use one)."""
    if is_remote(path):
        raise ValueError(f"{what} {os.fspath(path)!r} must be a local or mounted directory: its files are read by "
                         "local-only readers (ArrayRecord, ScaNN); only training workdirs may be object-store URLs")
    return _local_abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
    return os.fspath(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


def makedirs(path: str | os.PathLike) -> None:
    """Object stores have no directories: nothing to make there."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    return epath.Path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_format_json(path: str | os.PathLike, expected_format: str, *, what: str, hint: str = "") -> dict:
    """A JSON file that names its own format (a manifest, a saved config): missing, corrupted or of
    another format is a clear error naming the file up front, never a KeyError or a guess later.
    `what` names the thing for the message ("vocabulary"); `hint` says how to make one."""
    if not exists(path):
        raise FileNotFoundError(f"{path} not found: no {what} there" + (f" ({hint})" if hint else ""))
    try:
        data = json.loads(read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupted {what} ({e})") from None
    found = data.get("format") if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    if found != expected_format:
        raise ValueError(f"{path}: format {found!r}, expected {expected_format!r}: not a {what} this version reads")
    return data


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Readers see the old file or the new one, never half of it: locally through a temporary file
    and a rename; an object store's upload is already all or nothing."""
    if is_remote(path):
        epath.Path(path).write_bytes(bytes(data))
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_tree(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Copies the directory `source` (local or in a bucket) file by file to `target`; False when
    `source` is no directory (`os.path.isdir` of a URL is always False, so a bucket's was skipped)."""
    root = epath.Path(source)
    if not root.is_dir():
        return False
    for path in root.iterdir():   # (epath refuses a recursive glob in a bucket)
        if path.is_dir():
            copy_tree(path, join(target, path.name))
        else:
            write_bytes(join(target, path.name), path.read_bytes())
    return True


def write_npy_rows(path: str | os.PathLike, rows, dtype, *, chunk: int = 65536) -> None:
    """Writes an [N, ...] array-like (anything with .shape and row slicing: an array, a memory map,
    parts read as one) to a local .npy, `chunk` rows at a time, so a bank larger than memory can
    be written; atomically, through a temporary file and a rename. A value `dtype` cannot hold
    (an id past int32, a score past float16's range) is a ValueError, never a wrapped or inf row."""
    path = require_local(path, "a .npy file")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(rows.shape))
    try:
        for a in range(0, rows.shape[0], chunk):
            part = np.asarray(rows[a:a + chunk])
            cast = part.astype(dtype)
            if part.size and np.issubdtype(out.dtype, np.integer) and (
                    part.min() < np.iinfo(out.dtype).min or part.max() > np.iinfo(out.dtype).max):
                raise ValueError(f"{path}: rows {a}.. hold {part.min()}..{part.max()}, outside {out.dtype}")
            if np.issubdtype(out.dtype, np.floating) and np.issubdtype(part.dtype, np.number) and not np.array_equal(
                    np.isinf(cast), np.isinf(part)):
                raise ValueError(f"{path}: rows {a}.. hold values past {out.dtype}'s range")
            out[a:a + chunk] = cast
        out.flush()
    except BaseException:
        del out
        os.remove(tmp)
        raise
    del out
    os.replace(tmp, path)


class AppendableFile:
    """A file written by appending: appended to in place on a local disk; in an object store, held
    in memory (starting from the object already there, so a resumed run keeps its records) and
    uploaded whole by `flush`. Binary (`write(bytes)`), as tensorboardX's record writers are."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.remote = is_remote(self.path)
        self._lock = threading.Lock()  # tensorboardX flushes from its own thread
        if self.remote:
            self._buffer = io.BytesIO()
            if exists(self.path):
                self._buffer.write(read_bytes(self.path))
            self._uploaded = self._buffer.tell()
        else:
            makedirs(os.path.dirname(os.path.abspath(self.path)))
            self._file = open(self.path, "ab")

    def write(self, data: bytes) -> None:
        with self._lock:
            (self._buffer if self.remote else self._file).write(data)

    def flush(self) -> None:
        with self._lock:
            if not self.remote:
                self._file.flush()
            elif self._buffer.tell() != self._uploaded:
                epath.Path(self.path).write_bytes(self._buffer.getvalue())
                self._uploaded = self._buffer.tell()

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self._file.close()


class _RemoteEventFiles:
    """tensorboardX's writer factory for object-store URLs: its own gs:// writer needs
    google-cloud-storage; this one goes through epath like every other workdir file."""

    def open(self, path):
        return AppendableFile(path)

    def directory_check(self, path):
        check_backend(path)


def tensorboard_writer(logdir: str, **kwargs):
    """A tensorboardX SummaryWriter for a local or remote logdir."""
    from tensorboardX import SummaryWriter, record_writer
    if is_remote(logdir):
        record_writer.register_writer_factory(scheme(logdir), _RemoteEventFiles())
    return SummaryWriter(logdir, **kwargs)
