"""The artifact server: a directory of artifacts (a folder of .kvmlx files or a kvmlx store) served
over HTTP. Owns the catalog (CatalogEntry, build_catalog, artifact_files), HTTP Range parsing, the
ArtifactServer state (catalog, prices, the publisher's public key, the meter; which requests a token
allows), the Starlette app (/health, /catalog, GET|HEAD /artifacts/{digest}) with its streaming
range response, and `serve`. Tokens and metering come from `entitlements`; the client is `fetch`;
the commands are in kvmlx/cli/distribute.py; docs/DISTRIBUTION.md has the whole story.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import KvmlxError
from ..artifact.format import Artifact
from ..runtime.store import OBJECT_SUFFIX
from ..artifact import trust as trust_api
from .entitlements import DistributionError, Meter, TokenError, load_prices, verify_token
from .ledger import Ledger, Spent

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8377
CHUNK = 1 << 20
PRICES_FILE = "prices.json"
METERING_FILE = "metering.jsonl"


# ---------------------------------------------------------------- catalog


@dataclass(frozen=True)
class CatalogEntry:
    digest: str  # the artifact's header digest, hex: its address on the server
    path: Path
    model_id: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    encoding: str
    num_tokens: int
    file_bytes: int
    publisher_key: str | None
    price_usd: float | None  # per load; None: free

    def to_json(self) -> dict:
        return {"digest": self.digest, "name": self.path.name, "model": self.model_id,
                "model_fingerprint": self.model_fingerprint, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "dtype": self.dtype, "encoding": self.encoding, "tokens": self.num_tokens, "bytes": self.file_bytes,
                "publisher_key": self.publisher_key, "price_per_load_usd": self.price_usd,
                "url": f"/artifacts/{self.digest}"}


def artifact_files(directory: str | os.PathLike) -> list[Path]:
    """The artifacts a directory holds: a kvmlx store's objects/, or the directory's *.kvmlx files."""
    d = Path(directory)
    if (d / "objects").is_dir() and (d / "index.sqlite").exists():
        d = d / "objects"
    return sorted(p for p in d.glob(f"*{OBJECT_SUFFIX}") if p.is_file() and not p.name.startswith("."))


def build_catalog(directory: str | os.PathLike, prices: Mapping[str, float] | None = None) -> dict[str, CatalogEntry]:
    """{header digest hex: entry} for every valid artifact in `directory` (invalid files are skipped).

    A price is matched to its artifact by full digest or a unique prefix (8+ hex digits); a price for
    no artifact is an error (a typo would otherwise give the artifact away).
    """
    found: dict[str, CatalogEntry] = {}
    metas = []
    for path in artifact_files(directory):
        try:
            with Artifact(path) as art:
                h, sig, dg = art.header, art.signature, art.header_digest.hex()
        except (KvmlxError, OSError):
            continue
        metas.append((dg, path, h, trust_api.public_key_id(sig[0]) if sig else None))
    digests = [m[0] for m in metas]
    resolved: dict[str, float] = {}
    for key, price in (prices or {}).items():
        hits = [d for d in digests if d.startswith(key)] if len(key) >= 8 else []
        if len(hits) != 1:
            raise DistributionError(f"price for {key!r} matches {len(hits)} artifacts (give the full digest of one)")
        resolved[hits[0]] = price
    for dg, path, h, pub in metas:
        if dg in found:
            continue
        found[dg] = CatalogEntry(dg, path, h["model"]["id"], h["model"]["fingerprint"], h["tokenizer"]["fingerprint"],
                                 h["kv"]["dtype"], h["kv"].get("encoding", "raw"), h["kv"]["num_tokens"],
                                 path.stat().st_size, pub, resolved.get(dg) or None)
    return found

# ---------------------------------------------------------------- the server


MAX_DIGITS = 18  # a byte position with more digits is beyond any file (and beyond int()'s 4,300-digit limit)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) of a single 'bytes=' range; None: no/ignored range (send the whole file, 200);
    'bad': unsatisfiable (416). Numbers of any length are handled without converting long ones."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multiple or malformed ranges: RFC 9110 lets us ignore the header and send 200
    first, last = (g.lstrip("0") or ("0" if g else "") for g in m.groups())
    if len(first) > MAX_DIGITS:
        return "bad"  # starts past the end of any file
    if len(last) > MAX_DIGITS:
        return None  # an absurd end or suffix length: ignore the range, send the whole file
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            return "bad"
        return (max(0, size - n), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return "bad"
    return (start, min(end, size - 1))


class ArtifactServer:
    """The state behind the Starlette app: catalog, prices, the publisher's public key, the meter.

    `slack` bounds resumes: under one token, bytes served may exceed loads x size by at most this
    fraction of the size (an interrupted transfer loses what was in flight, counted as sent, and the
    client fetches it again). 1.0: at most one extra copy's worth per token (docs/DISTRIBUTION.md).
    """

    def __init__(self, directory: str | os.PathLike, *, prices: Mapping[str, float] | None = None,
                 publisher_key: str | bytes | None = None, log: str | os.PathLike | None = None,
                 slack: float = 1.0):
        self.config = {"directory": str(directory), "prices": dict(prices or {}), "log": None if log is None else str(log),
                       "slack": slack, "publisher_key": publisher_key if isinstance(publisher_key, str) else
                       (trust_api.public_key_id(publisher_key) if publisher_key else None)}
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DistributionError(f"{directory}: not a directory")
        all_prices = load_prices(self.directory / PRICES_FILE)
        all_prices.update(prices or {})
        self.catalog = build_catalog(self.directory, all_prices)
        if isinstance(publisher_key, str):
            publisher_key = _read_public_key(publisher_key)
        self.public_key = publisher_key
        if self.public_key is None and any(e.price_usd for e in self.catalog.values()):
            raise DistributionError("priced artifacts need --publisher-key (the public key that signs access tokens)")
        self.meter = Meter(log if log is not None else self.directory / METERING_FILE)
        self.ledger = Ledger(ledger_path(self.meter.path), seed_log=self.meter.path)
        self.slack = slack

    def authorize(self, entry: CatalogEntry, authorization: str | None, start: int, length: int) -> tuple[str | None, bool]:
        """(token id or None, is this a new load); raises _Denied(401|403, reason) when refused.

        A response starting at byte 0 is a new load: it needs a load left on the token and takes one.
        A response starting later is a resume: the token must already have a load, and the bytes
        served under it stay within loads x size (+ slack)."""
        if not entry.price_usd:
            return None, start == 0
        if not authorization or not authorization.startswith("Bearer "):
            raise _Denied(401, "this artifact is priced: send Authorization: Bearer <token>")
        try:
            claims = verify_token(authorization[7:].strip(), self.public_key, artifact=entry.digest)
        except TokenError as e:
            raise _Denied(403, str(e))
        tid = claims["tid"]
        try:
            if start == 0:
                self.ledger.take_load(tid, claims["loads"])
                return tid, True
            self.ledger.reserve(tid, length, entry.file_bytes, int(self.slack * entry.file_bytes))
        except Spent as e:
            raise _Denied(403, str(e))
        return tid, False  # bytes reserved now, corrected when the response ends

    def record(self, entry: CatalogEntry, tid: str | None, start: int, reserved: int, sent: int, load: bool, status: int) -> None:
        if tid is not None:
            self.ledger.settle(tid, reserved, sent)
        self.meter.append({"when": time.time(), "token": tid, "artifact": entry.digest, "bytes": sent,
                           "start": start, "load": load, "status": status, "worker": os.getpid()})


def ledger_path(log: Path) -> Path:
    """The SQLite ledger that goes with a metering log: `<log name>.ledger.sqlite` beside it."""
    return log.with_name(log.name + ".ledger.sqlite")


class _Denied(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _read_public_key(text: str) -> bytes:
    """An `ed25519:...` key id, or a file holding one (the output of `kvmlx keygen`'s public key)."""
    t = text.strip()
    if not t.startswith(trust_api.KEY_PREFIX) and Path(t).is_file():
        t = Path(t).read_text().strip()
    return trust_api.parse_public_key(t)


def create_app(server: ArtifactServer):
    """The Starlette application: /health, /catalog, GET|HEAD /artifacts/{digest}."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def health(request):
        return JSONResponse({"status": "ok", "artifacts": len(server.catalog)})

    async def catalog(request):
        return JSONResponse({"artifacts": [e.to_json() for e in server.catalog.values()],
                             "publisher_key": trust_api.public_key_id(server.public_key) if server.public_key else None})

    async def artifact(request):
        digest = request.path_params["digest"].lower()
        entry = server.catalog.get(digest)
        if entry is None:
            return JSONResponse({"error": "no such artifact"}, status_code=404)
        size = entry.file_bytes
        etag = f'"{digest}"'
        base = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "no-store" if entry.price_usd else "public, max-age=86400"}
        rng = _parse_range(request.headers.get("range"), size)
        if_range = request.headers.get("if-range")
        if rng is not None and if_range is not None and if_range.strip() != etag:
            rng = None  # the client's partial copy is of something else: send the whole file
        if rng == "bad":
            return Response(status_code=416, headers={**base, "Content-Range": f"bytes */{size}"})
        start, end = rng if rng else (0, size - 1)
        length = end - start + 1
        status = 206 if rng else 200
        headers = {**base, "Content-Length": str(length), "Content-Type": "application/octet-stream"}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if request.method == "HEAD":
            if entry.price_usd:  # the token is checked (not spent): no metadata of a priced artifact for free
                auth = request.headers.get("authorization") or ""
                if not auth.startswith("Bearer "):
                    return Response(status_code=401, headers={**base, "WWW-Authenticate": "Bearer"})
                try:
                    verify_token(auth[7:].strip(), server.public_key, artifact=entry.digest)
                except TokenError:
                    return Response(status_code=403, headers=base)
            return Response(status_code=status, headers=headers)
        try:
            tid, load = server.authorize(entry, request.headers.get("authorization"), start, length)
        except _Denied as d:
            extra = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if d.status == 401 else {}
            return JSONResponse({"error": d.reason}, status_code=d.status, headers=extra)
        return _FileRange(server, entry, start, length, status, headers, tid, load)

    app = Starlette(routes=[Route("/health", health), Route("/catalog", catalog),
                            Route("/artifacts/{digest}", artifact, methods=["GET", "HEAD"])])
    app.state.server = server
    return app


class _FileRange:
    """An ASGI response streaming one byte range of a file; logs what was actually sent when it ends
    (completed, or cut off by the client), so the metering log holds real bytes."""

    def __init__(self, server, entry, start, length, status, headers, tid, load):
        self.server, self.entry, self.start, self.length = server, entry, start, length
        self.status, self.headers, self.tid, self.load = status, headers, tid, load

    async def __call__(self, scope, receive, send) -> None:
        import anyio
        sent = 0
        try:
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]})
            with open(self.entry.path, "rb") as f:
                f.seek(self.start)
                left = self.length
                while left:
                    data = await anyio.to_thread.run_sync(f.read, min(CHUNK, left))
                    if not data:
                        break  # the file shrank under us: the client sees a short body and retries
                    await send({"type": "http.response.body", "body": data, "more_body": left > len(data)})
                    sent += len(data)
                    left -= len(data)
                if left:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away; what it got is logged below
        finally:
            self.server.record(self.entry, self.tid, self.start, 0 if self.load else self.length, sent, self.load, self.status)


CONFIG_ENV = "KVMLX_ARTIFACT_SERVER"  # how `--workers` hands the configuration to each worker process


def app_from_env():
    """The app factory each uvicorn worker calls: an ArtifactServer from the JSON in $KVMLX_ARTIFACT_SERVER."""
    return create_app(ArtifactServer(**json.loads(os.environ[CONFIG_ENV])))


def run_server(server: ArtifactServer, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = 1) -> None:
    """Run an ArtifactServer's app under uvicorn until interrupted; with `workers` > 1, that many
    processes (each builds the same server from `server.config`; they share the ledger and the log)."""
    import uvicorn
    if workers <= 1:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)
        return
    os.environ[CONFIG_ENV] = json.dumps(server.config)
    uvicorn.run(f"{__name__}:app_from_env", factory=True, workers=workers, host=host, port=port,
                log_level="warning", access_log=False)


def serve(directory: str | os.PathLike, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = 1,
          **kwargs) -> None:
    """Run the artifact server (uvicorn, `workers` processes) until interrupted."""
    run_server(ArtifactServer(directory, **kwargs), host=host, port=port, workers=workers)
