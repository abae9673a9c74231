"""Fetch a URL into a file: resumable, atomic, optionally checksummed, with a progress bar.

Bytes go to ``DEST.part`` first; a later call resumes it with an HTTP ``Range`` request (or
starts over when the server ignores it) and only a complete, verified file is renamed to
``DEST``, so ``DEST`` is never half-written. Plain ``urllib``: honours ``HTTPS_PROXY`` and also
reads ``file://`` URLs (a local mirror).
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from features.errors import ModalstoreError
from pipelines.manifest import sha256_file

CHUNK = 1 << 16


class DownloadError(ModalstoreError, OSError):
    """A download failed or its content is not what was expected (names the URL)."""


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest`` unless ``dest`` already holds it (matching ``sha256`` if given).

    Raises ``DownloadError`` naming the URL on a network or HTTP error, a short read (the
    partial ``DEST.part`` is kept: call again to resume) or a checksum mismatch (the bad file
    is removed).
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # an earlier, different file: fetch the right one
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "modalstore"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part is already whole (or stale): start over once
            part.unlink()
            return download(url, dest, sha256=sha256, progress=progress, timeout=timeout)
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot download: {reason}") from exc
    with response:
        resumed = offset > 0 and getattr(response, "status", None) == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            resumed = False  # a range we did not ask for: start over
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            part.open("ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
            ) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"{url}: interrupted after {f.tell()} bytes ({exc!r}); run again to resume {part}"
                ) from exc
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: got {size} of {total} bytes; run again to resume {part}")
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            part.unlink()
            raise DownloadError(
                f"{url}: sha256 {got} does not match the expected {sha256}; the download was removed "
                "(a wrong or changed file: check the URL)"
            )
    os.replace(part, dest)
    return dest
