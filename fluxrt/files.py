"""File helpers every stage uses: one JSON reader, one hasher, writes that never leave half a file,
and the lock and clean-up that keep concurrent writers of one folder apart."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fluxrt.errors import FluxRTError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, what: str, error: type[FluxRTError] = FluxRTError) -> dict:
    """The JSON object in ``path``; ``error`` (naming ``what`` and the path) if it is missing,
    unreadable, not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def separate_folders(source: Path, out: Path, source_what: str, out_flag: str, error: type) -> None:
    """Refuse an output folder that is, contains or lies inside the source folder (writing there would change
    the source, or make one folder two things), and one that is a file."""
    a, b = Path(source).resolve(), Path(out).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise error(f"{out_flag} {out} is, contains or lies inside {source_what} {source}: name a folder of its own")
    if b.exists() and not b.is_dir():
        raise error(f"{out_flag} {out} is a file, not a folder: name a folder (new or one this command wrote)")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed over ``path`` when the block
    completes, deleted when it raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it 0600: give it the mode any other new file gets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def replace_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the folder ``src``: copied beside it under a temporary name first, so a
    killed copy leaves a ``.NAME.tmp-PID`` folder (see :func:`remove_leftovers`), never half a ``dst``."""
    staging = Path(dst).with_name(f".{Path(dst).name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(staging, dst)


def remove_leftovers(folder: Path, *patterns: str) -> None:
    """Delete temporaries a killed writer left behind; call it holding the lock their writers hold."""
    for pattern in patterns:
        for path in Path(folder).glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed) for the duration of the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
