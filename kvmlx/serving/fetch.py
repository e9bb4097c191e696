"""The fetch client: download an artifact from an artifact server into the local store, resuming a
partial download (Range + If-Range against the server's ETag) and verifying it (header digest,
signature, every tensor digest) before it becomes visible. Owns FetchResult, `fetch` (with its
locked partial-download directory in the store's tmp/) and `fetch_catalog`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import IntegrityError, KvmlxError
from ..artifact.format import Artifact
from ..runtime.store import Store
from ..artifact import trust as trust_api
from .entitlements import DistributionError


@dataclass
class FetchResult:
    key: str
    digest: str
    path: Path
    bytes_downloaded: int  # this run
    resumed_from: int  # bytes already in the partial file when this run started
    signature: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"key": self.key, "digest": self.digest, "path": str(self.path), "bytes_downloaded": self.bytes_downloaded,
                "resumed_from": self.resumed_from, "signature": self.signature}


def _digest_of_url(url: str) -> str:
    m = re.search(r"/artifacts/([0-9a-fA-F]{64})/?(?:\?.*)?$", url)
    if not m:
        raise DistributionError(f"{url}: not an artifact URL (…/artifacts/<64-hex digest>)")
    return m.group(1).lower()


@contextlib.contextmanager
def _partial(store: Store, digest: str) -> Iterator[Path]:
    """tmp/fetch-<digest>/ in the store: the partial download, flock'ed while a fetch works on it
    (so two fetches of one artifact do not interleave, and `store gc` removes it only when abandoned)."""
    d = store.tmp / f"fetch-{digest}"
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DistributionError(f"another fetch of {digest[:16]} is running") from None
        yield d
    finally:
        os.close(fd)


def fetch(url: str, *, token: str | None = None, store: Store | str | os.PathLike | None = None,
          require_signed: bool = False, trust_list=None, progress: bool = False, timeout: float = 30.0,
          chunk_size: int = 1 << 16, on_chunk: Callable[[int, int], None] | None = None) -> FetchResult:
    """Download an artifact into the local store, resuming a partial download, verifying before it is visible.

    The partial file lives in the store's tmp/fetch-<digest>/ with the server's ETag beside it; a
    later fetch resumes it with `Range` + `If-Range`. When the body is complete: the header digest must
    equal the one in the URL, the signature is checked (required with `require_signed`), and
    `Store.add` checks every tensor digest before the artifact appears in objects/. A file that fails
    is deleted (not resumed). `on_chunk(done, total)` is called after every chunk written (tests use
    it to cut a download off).
    """
    import httpx

    digest = _digest_of_url(url)
    store = store if isinstance(store, Store) else Store(store)
    with _partial(store, digest) as d:
        part, meta = d / "artifact.part", d / "etag"
        try:
            resumed_from, got = _download(url, token, part, meta, digest, timeout, progress, chunk_size, on_chunk)
        except httpx.HTTPError as e:
            raise DistributionError(f"{url}: {type(e).__name__}: {e or 'transfer failed'}; run fetch again to resume") from None
        try:
            with Artifact(part) as art:
                if art.header_digest.hex() != digest:
                    raise IntegrityError(f"{url}: the artifact's header digest is {art.header_digest.hex()[:16]}…, "
                                         f"not the {digest[:16]}… asked for")
            sig = trust_api.check_signature(part, require_signed, trust_list)
            key = store.add(part)  # checks every tensor digest before the object becomes visible
        except KvmlxError:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise
        shutil.rmtree(d, ignore_errors=True)
    return FetchResult(key, digest, store.path(key), got, resumed_from, sig.to_json())


def _download(url, token, part: Path, meta: Path, digest: str, timeout, progress, chunk_size, on_chunk) -> tuple[int, int]:
    """Fill `part` with the whole body, resuming what it holds; (bytes it held and kept, bytes received)."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    have = part.stat().st_size if part.exists() else 0
    etag = meta.read_text() if meta.exists() and have else None
    if have and etag:
        headers.update({"Range": f"bytes={have}-", "If-Range": etag})
    else:
        have = 0
    got = 0
    with httpx.Client(timeout=timeout) as client, client.stream("GET", url, headers=headers) as r:
        if r.status_code in (401, 403, 404):
            r.read()
            try:
                reason = r.json().get("error", "")
            except ValueError:
                reason = r.text[:200]
            raise DistributionError(f"{url}: HTTP {r.status_code}: {reason}")
        if r.status_code == 416 and have:
            part.unlink(missing_ok=True)
            raise DistributionError(f"{url}: the server refused the resume (HTTP 416); partial file removed, fetch again")
        if r.status_code not in (200, 206):
            raise DistributionError(f"{url}: HTTP {r.status_code}")
        if r.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("content-range", ""))
            if not m or int(m.group(1)) != have:
                raise DistributionError(f"{url}: server sent a range that does not continue the partial file")
            total = int(m.group(3))
        else:
            have = 0  # a whole body (no range asked, or the file changed): start over
            total = int(r.headers.get("content-length", 0)) or None
        if r.headers.get("etag"):
            meta.write_text(r.headers["etag"])
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"fetch {digest[:12]}", file=sys.stderr, disable=not progress, leave=False)
        with bar, open(part, "ab" if have else "wb") as f:
            for chunk in r.iter_bytes(chunk_size):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
                if on_chunk:
                    f.flush()
                    on_chunk(have + got, total or 0)
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise DistributionError(f"{url}: download ended at {size:,} of {total:,} bytes; run fetch again to resume")
    return have, got


def fetch_catalog(base_url: str, timeout: float = 30.0) -> dict:
    import httpx
    r = httpx.get(base_url.rstrip("/") + "/catalog", timeout=timeout)
    if r.status_code != 200:
        raise DistributionError(f"{base_url}: catalog: HTTP {r.status_code}")
    return r.json()
