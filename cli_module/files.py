"""Local files: the one atomic-write helper (temporary name beside the target, then rename, so a reader or a
killed run never sees half a file) and the cache folder of converted models and mirrored checkpoints.

``pipelines.storage.write_atomic`` uses this for local paths and adds ``s3://``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> Path:
    """Write ``data`` (bytes, or a function that writes a file at the path it is given) to ``path`` atomically;
    creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    try:
        if isinstance(data, bytes | bytearray):
            Path(tmp).write_bytes(data)
        else:
            data(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the finished file should read like any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cache_root() -> Path:
    """Where converted models and mirrored checkpoints live: ``$CROSSLAYER_CACHE`` if set, else
    ``~/.cache/crosslayer``."""
    env = os.environ.get("CROSSLAYER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crosslayer"
