"""Atomic file writes (a reader sees the old file or the whole new one, never half of one) and folder locks.

Every artifact a run may resume from (checkpoint records, result JSON, saved
models, exported `.tflite` files) is written through these, so a run killed
mid-write leaves the previous version, or nothing, in place.
"""

import contextlib
import json
import os
import pathlib
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` that replaces `path` when the block ends without error.

    For writers that want a file name rather than bytes (`model.save`,
    `np.savez`). The temporary name keeps `path`'s suffix, so writers that check
    or append it (`.keras`, `.npz`) accept it. Missing parent folders are
    created; on an error the temporary file is removed and `path` is untouched.

    Args:
        path: the final file.

    Yields:
        The temporary `pathlib.Path` to write.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield pathlib.Path(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_atomically(path, data):
    """Writes `data` to `path` atomically.

    Args:
        path: the file to write (parent folders are created).
        data: `bytes`, or `str` (written as UTF-8).

    Returns:
        `path` as a `pathlib.Path`.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"Expected `data` to be bytes or str. Received: data of type {type(data).__name__}")
    path = pathlib.Path(path)
    with atomic_path(path) as temporary:
        temporary.write_bytes(bytes(data))
    return path


def write_json(path, value, **dumps_options):
    """Writes `value` as JSON (indent 2 unless told, a final newline) atomically.

    Args:
        path: the file to write (parent folders are created).
        value: anything `json.dumps` accepts with `dumps_options`.
        **dumps_options: passed to `json.dumps` (e.g. `sort_keys=True`, `default=str`).

    Returns:
        `path` as a `pathlib.Path`.
    """
    dumps_options.setdefault("indent", 2)
    return write_atomically(path, json.dumps(value, **dumps_options) + "\n")


@contextlib.contextmanager
def folder_lock(folder):
    """Holds an exclusive `fcntl.flock` on `folder/.lock` for the block; a second holder stops at once.

    The operating system releases the lock when its process ends, however it ends (killed, SIGTERM), so a dead
    run never leaves a lock behind and none is taken over by guesswork; the file keeps the last holder's
    process id for the message.

    Raises:
        ValueError: another process holds the folder.
    """
    import fcntl

    folder = pathlib.Path(folder)
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise ValueError(f"Another run (process {owner}) is writing into {str(folder)!r}; wait for it to end or "
                         f"use another --out. Received: out_dir={str(folder)!r}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def file_sha256(path):
    """The SHA-256 of a file's bytes (16 hex digits), to recognise the file a record describes."""
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]
