"""Crash-safe file writing (a reader never sees a half-written file) and exclusive locks on folders."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync the result and rename it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a file written in place would follow the umask
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON, turning a missing or corrupt file into a one-line `VitlabError`."""
    from vitlab.errors import VitlabError

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise VitlabError(f"{what} {path} does not exist") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits, deep nesting
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise VitlabError(f"{what} {path} is not valid JSON ({reason}); it is corrupt or truncated") from None


def write_tensors(path: str | Path, tensors: dict) -> None:
    """A safetensors file, atomically, written through Python's own file I/O: safetensors' file functions take only
    UTF-8 paths, and a folder name that is not UTF-8 made a good run folder read as damaged."""
    from safetensors.torch import save

    data = save(tensors)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_tensors(path: str | Path) -> dict:
    """Every tensor of a safetensors file (any path the OS takes); a damaged file raises safetensors' own errors."""
    from safetensors.torch import load

    return load(Path(path).read_bytes())


def resolved(path: str | Path) -> Path:
    """`Path(path).resolve()`, with a symbolic link loop (RuntimeError before Python 3.13, OSError after) turned into a
    one-line `VitlabError`."""
    from vitlab.errors import VitlabError

    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as error:
        raise VitlabError(f"cannot resolve {path} ({error}); remove the symbolic link loop or choose another path") from None


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON record as a line and flush it to disk (the history survives a crash)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a JSON-lines file with `records`, atomically."""
    text = "".join(json.dumps(record) + "\n" for record in records)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def read_epoch_history(path: str | Path) -> dict[int, dict]:
    """A run's metrics.jsonl as {epoch: record}; a resumed run may repeat an epoch, the last line wins.
    A missing file is an empty history."""
    path = Path(path)
    history: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                history[record["epoch"]] = record
    return history


class ExclusiveLock:
    """An exclusive lock (fcntl.flock on `path`) held while a process works on something. The kernel
    releases it when the process dies, so a killed process never leaves a stale lock; the file names its
    holder as host:pid. flock also excludes processes on other machines on a shared NFSv4 file system.

    `busy` is the error raised when another process holds it; '{holder}' in it is replaced by the holder."""

    def __init__(self, path: str | Path, busy: str) -> None:
        self.path = Path(path)
        self.busy = busy
        self.handle = None

    def __enter__(self) -> ExclusiveLock:
        import fcntl
        import socket

        from vitlab.errors import VitlabError

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as error:
            raise VitlabError(f"cannot open the lock file {self.path} ({error.strerror or error}); "
                              "make its folder writable or delete what is in its place") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise VitlabError(self.busy.replace("{holder}", holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()}:{os.getpid()}")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def lock_holder(path: str | Path) -> str | None:
    """Who holds the ExclusiveLock at `path` right now (host:pid), or None when nobody does."""
    import fcntl

    path = Path(path)
    if not path.is_file():
        return None
    try:
        handle = open(path)
    except OSError:
        return None  # unreadable: whoever trains the run will report it when it takes the lock
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "?"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
