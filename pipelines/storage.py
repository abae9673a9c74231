"""Where a store lives: a local folder, or an fsspec URL (``s3://``, ``gs://``, ``memory://``...).

Everything that writes a store goes through ``Location``, so the same extraction code
writes to a folder or to object storage. Locally, files are written to a temporary name and
renamed; on object storage an object appears only once its upload completes, which gives
the same guarantee: a reader never sees half a shard. Shards are written to local temporary
files first (tar writing needs a seekable file) and then uploaded.

Credentials and endpoints are fsspec's: e.g. ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
and ``FSSPEC_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) for an S3-compatible server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipelines.shards import write_atomic


def is_url(path: str | Path) -> bool:
    """True for an fsspec URL other than ``file://`` (which is a local path)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_path(path: str | Path) -> Path:
    return Path(path[len("file://") :] if isinstance(path, str) and path.startswith("file://") else path)


def open_url(url: str, mode: str = "rb"):
    """An open file object for a URL (fsspec) or a local path."""
    if is_url(url):
        import fsspec

        return fsspec.open(url, mode).open()
    return open(local_path(url), mode)


def url_size(url: str | Path) -> int:
    if is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.size(path))
    return os.path.getsize(local_path(url))


def read_url(url: str | Path) -> bytes:
    if is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path)
    return local_path(url).read_bytes()


class Location:
    """A store root with the few file operations extraction needs, local or remote."""

    def __init__(self, root: str | Path) -> None:
        self.remote = is_url(root)
        if self.remote:
            import fsspec

            self.url = str(root).rstrip("/")
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
            self.base = self.base.rstrip("/")
        else:
            self.path = local_path(root)

    def __str__(self) -> str:
        return self.url if self.remote else str(self.path)

    def join(self, rel: str) -> str | Path:
        """The full URL (remote) or path (local) of ``rel``."""
        return f"{self.url}/{rel}" if self.remote else self.path / rel

    def _key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def exists(self, rel: str = "") -> bool:
        if self.remote:
            return self.fs.exists(self._key(rel)) if rel else self.fs.exists(self.base)
        return (self.path / rel).exists()

    def is_empty(self) -> bool:
        if self.remote:
            return not self.fs.exists(self.base) or not self.fs.ls(self.base)
        return not self.path.exists() or not any(self.path.iterdir())

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._key(rel)) if self.remote else (self.path / rel).read_bytes()

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._key(rel))) if self.remote else (self.path / rel).stat().st_size

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file: a temporary name and a rename locally, one upload remotely."""
        if self.remote:
            self.fs.pipe_file(self._key(rel), data)
        else:
            write_atomic(self.path / rel, data)

    def put_file(self, local: Path, rel: str) -> None:
        """Publish a finished local file at ``rel`` (moved locally, uploaded then deleted remotely)."""
        if self.remote:
            self.fs.put_file(str(local), self._key(rel))
            local.unlink(missing_ok=True)
        else:
            dst = self.path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, dst)

    def link(self, src: str, dst: str) -> None:
        """Make ``dst`` the same file as ``src``: a hard link locally (copy where links fail), a
        server-side copy remotely."""
        if self.remote:
            self.fs.copy(self._key(src), self._key(dst))
            return
        s, d = self.path / src, self.path / dst
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = d.parent / f".{d.name}.tmp-link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(s, tmp)
        except OSError:
            shutil.copy2(s, tmp)
        os.replace(tmp, d)

    def listdir(self, rel: str) -> list[str]:
        """Names of the entries (files and folders) directly under ``rel``; [] when absent."""
        if self.remote:
            try:
                entries = self.fs.ls(self._key(rel), detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})
        folder = self.path / rel
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def remove(self, rel: str) -> None:
        """Delete a file or a whole folder, if present."""
        if self.remote:
            if self.fs.exists(self._key(rel)):
                self.fs.rm(self._key(rel), recursive=True)
            return
        p = self.path / rel
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def staging_dir(self, rel: str) -> Path:
        """Where to write a file that will be published at ``rel``: its own folder locally (so
        the final rename stays on one filesystem), a local temporary folder for a remote store."""
        if self.remote:
            import tempfile

            return Path(tempfile.mkdtemp(prefix="modalstore-"))
        folder = (self.path / rel).parent
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def as_location(store) -> Location:
    """``store`` as a Location: a folder or URL, or a Location already."""
    return store if isinstance(store, Location) else Location(store)
