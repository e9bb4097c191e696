"""Host, sell and fetch KV artifacts over HTTP (and through the Hugging Face Hub).

    server:  kvmlx serve-artifacts DIR --publisher-key ed25519:... [--price DIGEST=USD]
    buyer:   kvmlx fetch http://host:8377/artifacts/<digest> --token <token>
    tokens:  kvmlx token issue --artifact <digest> --loads 3 --expires 30d      (publisher, private key)
             kvmlx token report --log DIR/metering.jsonl --prices DIR/prices.json

docs/DISTRIBUTION.md has the whole story: endpoints, the token format, how loads are counted.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import IntegrityError, KvmlxError
from ..artifact.format import Artifact, canonical_json
from ..runtime.store import OBJECT_SUFFIX, Store
from ..artifact import trust as trust_api

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8377
TOKEN_VERSION = 1
CHUNK = 1 << 20
PRICES_FILE = "prices.json"
METERING_FILE = "metering.jsonl"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_TOKEN_CHARS = 4096


class DistributionError(KvmlxError):
    """Serving, fetching or pushing an artifact failed (bad URL, HTTP error, bad catalog)."""


class TokenError(KvmlxError):
    """An access token is malformed, forged, expired, for another artifact, or used up."""


# ---------------------------------------------------------------- access tokens


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise TokenError("malformed token (not base64url)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:  # binascii.Error: an impossible length
        raise TokenError("malformed token (not base64url)") from None


def parse_duration(text: str | int | float) -> float:
    """'3600', '90s', '15m', '12h', '30d' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 3600, 15m, 12h, 30d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def parse_expiry(text: str | int | float, now: float | None = None) -> float:
    """An expiry: a duration from now ('30d'), a Unix time (> 10^9), or an ISO 8601 UTC time."""
    now = time.time() if now is None else now
    if isinstance(text, str) and re.fullmatch(r"\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d)?Z?)?", text.strip()):
        t = text.strip().rstrip("Z")
        fmt = "%Y-%m-%dT%H:%M:%S" if t.count(":") == 2 else "%Y-%m-%dT%H:%M" if "T" in t else "%Y-%m-%d"
        import calendar
        return float(calendar.timegm(time.strptime(t, fmt)))
    value = parse_duration(text)
    return value if value > 1e9 else now + value


def issue_token(private_key, artifact: str, loads: int, expires: float, *, token_id: str | None = None,
                now: float | None = None) -> str:
    """A compact access token: base64url(canonical JSON claims) "." base64url(Ed25519 signature).

    Claims: v (version), tid (token id), art (artifact header digest, hex), loads (max full downloads),
    exp and iat (Unix seconds), iss (the publisher's key id). Only the private key can mint one.
    """
    if not _DIGEST_RE.match(artifact):
        raise TokenError(f"--artifact must be a 64-hex header digest, got {artifact!r}")
    if not isinstance(loads, int) or loads < 1:
        raise TokenError("loads must be >= 1")
    claims = {"v": TOKEN_VERSION, "tid": token_id or uuid.uuid4().hex, "art": artifact, "loads": loads,
              "exp": int(expires), "iat": int(time.time() if now is None else now),
              "iss": trust_api.public_key_id(private_key)}
    body = canonical_json(claims)
    return f"{_b64e(body)}.{_b64e(private_key.sign(body))}"


def verify_token(token: str, public_key: bytes, *, artifact: str | None = None, now: float | None = None) -> dict:
    """The claims of a token signed by `public_key`; TokenError if forged, malformed, expired or for another artifact."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS or token.count(".") != 1:
        raise TokenError("malformed token")
    body_b64, sig_b64 = token.split(".")
    body, sig = _b64d(body_b64), _b64d(sig_b64)
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(sig, body)
    except (InvalidSignature, ValueError):
        raise TokenError("token signature does not verify (forged, altered, or from another publisher)") from None
    try:
        claims = json.loads(body)
    except ValueError:
        raise TokenError("malformed token claims") from None
    if not (isinstance(claims, dict) and claims.get("v") == TOKEN_VERSION and isinstance(claims.get("tid"), str)
            and isinstance(claims.get("art"), str) and isinstance(claims.get("loads"), int)
            and isinstance(claims.get("exp"), int)):
        raise TokenError("malformed token claims")
    if claims["exp"] <= (time.time() if now is None else now):
        raise TokenError("token expired")
    if artifact is not None and claims["art"] != artifact:
        raise TokenError("token is for another artifact")
    return claims


def token_claims_unverified(token: str) -> dict:
    """The claims of a token without checking its signature (for display only)."""
    try:
        return json.loads(_b64d(token.split(".")[0]))
    except (ValueError, IndexError):
        raise TokenError("malformed token") from None


# ---------------------------------------------------------------- catalog and prices


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


def parse_prices(items: Mapping[str, Any] | list[str] | tuple[str, ...]) -> dict[str, float]:
    """{'DIGEST': usd} from a mapping or from ['DIGEST=USD', ...] (the --price option)."""
    if not isinstance(items, Mapping):
        pairs = {}
        for item in items:
            digest_, sep, usd = item.partition("=")
            if not sep:
                raise DistributionError(f"--price wants DIGEST=USD, got {item!r}")
            pairs[digest_.strip()] = usd.strip()
        items = pairs
    out = {}
    for d, usd in items.items():
        try:
            price = float(usd)
        except (TypeError, ValueError):
            raise DistributionError(f"price of {d}: not a number ({usd!r})") from None
        if not (price >= 0 and price < float("inf")):
            raise DistributionError(f"price of {d}: must be a finite number >= 0")
        out[str(d).lower()] = price
    return out


def load_prices(path: str | os.PathLike) -> dict[str, float]:
    """prices.json: {"DIGEST": usd_per_load, ...} (or {"prices": {...}}); missing file: no prices."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DistributionError(f"{path}: not a readable prices file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("prices"), dict):
        data = data["prices"]
    if not isinstance(data, dict):
        raise DistributionError(f"{path}: expected a JSON object of DIGEST: USD")
    return parse_prices(data)


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


# ---------------------------------------------------------------- metering


class Meter:
    """The metering log (JSON lines, appended and fsync'ed) and the per-token counts rebuilt from it.

    One line per served response: {"when", "token", "artifact", "bytes", "start", "load", "status"}.
    `load` is true for a response that starts at byte 0 under a token (a new download); resumes
    (start > 0) are logged with their bytes but are not loads.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.loads: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        for rec in read_log(self.path):
            if rec.get("token"):
                self.bytes[rec["token"]] = self.bytes.get(rec["token"], 0) + int(rec.get("bytes", 0))
                if rec.get("load"):
                    self.loads[rec["token"]] = self.loads.get(rec["token"], 0) + 1

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


def read_log(path: str | os.PathLike) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line after a crash
        if isinstance(rec, dict):
            out.append(rec)
    return out


def report(log: str | os.PathLike, prices: Mapping[str, float] | None = None, *,
           egress_per_gb: float | None = None, bytes_per_gb: float | None = None) -> dict:
    """Per-artifact loads, revenue and bytes served from a metering log, with the egress they cost.

    Revenue = paid loads (loads under a token) x the artifact's price per load; egress cost = bytes
    served / bytes_per_gb x egress_per_gb (kvmlx.measure.cost's defaults: $0.09 per 1.024e9 bytes).
    """
    from ..measure.cost import CostInputs
    defaults = CostInputs()
    egress = defaults.egress_per_gb if egress_per_gb is None else egress_per_gb
    gb = defaults.bytes_per_gb if bytes_per_gb is None else bytes_per_gb
    prices = {k.lower(): v for k, v in (prices or {}).items()}
    rows: dict[str, dict] = {}
    for rec in read_log(log):
        art = rec.get("artifact")
        if not isinstance(art, str):
            continue
        r = rows.setdefault(art, {"artifact": art, "loads": 0, "paid_loads": 0, "requests": 0, "bytes": 0, "tokens": set()})
        r["requests"] += 1
        r["bytes"] += int(rec.get("bytes", 0))
        if rec.get("load"):
            r["loads"] += 1
            if rec.get("token"):
                r["paid_loads"] += 1
        if rec.get("token"):
            r["tokens"].add(rec["token"])
    out = []
    for art, r in sorted(rows.items()):
        price = next((p for k, p in prices.items() if art.startswith(k)), 0.0)
        r["tokens"] = len(r["tokens"])
        r["price_per_load_usd"] = price
        r["revenue_usd"] = r["paid_loads"] * price
        r["egress_cost_usd"] = r["bytes"] / gb * egress
        r["net_usd"] = r["revenue_usd"] - r["egress_cost_usd"]
        out.append(r)
    totals = {k: sum(r[k] for r in out) for k in ("loads", "paid_loads", "bytes", "revenue_usd", "egress_cost_usd", "net_usd")}
    return {"artifacts": out, "totals": totals, "egress_per_gb": egress, "bytes_per_gb": gb}


def format_report(rep: dict) -> str:
    lines = [f"{'artifact':<16} {'loads':>6} {'paid':>6} {'bytes':>14} {'revenue $':>11} {'egress $':>10} {'net $':>11}"]
    for r in rep["artifacts"] + [{"artifact": "total", **rep["totals"]}]:
        lines.append(f"{r['artifact'][:16]:<16} {r['loads']:>6} {r['paid_loads']:>6} {r['bytes']:>14,} "
                     f"{r['revenue_usd']:>11.4f} {r['egress_cost_usd']:>10.6f} {r['net_usd']:>11.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the server


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) of a single 'bytes=' range; None: no/ignored range; 'bad': unsatisfiable."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multiple or malformed ranges: RFC 9110 lets us ignore the header and send 200
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        if n == 0:
            return "bad"
        return (max(0, size - n), size - 1)
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
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
        self.slack = slack
        self._lock = threading.Lock()

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
        with self._lock:
            used = self.meter.loads.get(tid, 0)
            served = self.meter.bytes.get(tid, 0)
            if start == 0:
                if used >= claims["loads"]:
                    raise _Denied(403, f"token used up ({used} of {claims['loads']} loads)")
                self.meter.loads[tid] = used + 1
                return tid, True
            if used == 0:
                raise _Denied(403, "a resume needs a download started with this token (request from byte 0 first)")
            if served + length > used * entry.file_bytes + self.slack * entry.file_bytes:
                raise _Denied(403, f"token used up ({used} of {claims['loads']} loads downloaded)")
            self.meter.bytes[tid] = served + length  # reserved now, corrected when the response ends
            return tid, False

    def record(self, entry: CatalogEntry, tid: str | None, start: int, reserved: int, sent: int, load: bool, status: int) -> None:
        with self._lock:
            if tid is not None:
                self.meter.bytes[tid] = self.meter.bytes.get(tid, 0) - reserved + sent
        self.meter.append({"when": time.time(), "token": tid, "artifact": entry.digest, "bytes": sent,
                           "start": start, "load": load, "status": status})


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


def serve(directory: str | os.PathLike, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **kwargs) -> None:
    """Run the artifact server (uvicorn) until interrupted."""
    import uvicorn
    server = ArtifactServer(directory, **kwargs)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------- the client


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


# ---------------------------------------------------------------- Hugging Face Hub


def push(artifact: str | os.PathLike, repo: str, *, path_in_repo: str | None = None, token: str | None = None,
         private: bool = False, revision: str | None = None, create: bool = True) -> dict:
    """Upload an artifact to a Hub repository (created if missing) as `path_in_repo` (default: its file name)."""
    from huggingface_hub import HfApi
    path = Path(artifact)
    with Artifact(path) as art:  # never upload a file that is not an artifact
        digest = art.header_digest.hex()
    api = HfApi(token=token)
    name = path_in_repo or path.name
    try:
        if create:
            api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_file(path_or_fileobj=str(path), path_in_repo=name, repo_id=repo, revision=revision,
                               commit_message=f"kvmlx artifact {digest[:16]}")
    except Exception as e:  # huggingface_hub's HTTP, auth and validation errors
        if isinstance(e, KvmlxError):
            raise
        raise DistributionError(f"push to {repo}: {type(e).__name__}: {_first_line(e)}") from None
    return {"repo": repo, "file": name, "digest": digest, "commit": str(getattr(info, "oid", "") or info)}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?::(.+))?", spec)
    if not m or ".." in m.group(1) or (m.group(2) and ".." in m.group(2).split("/")):
        raise DistributionError(f"{spec!r}: expected OWNER/NAME or OWNER/NAME:FILE")
    return m.group(1), m.group(2)


def pull(spec: str, *, store: Store | str | os.PathLike | None = None, require_signed: bool = False, trust_list=None,
         revision: str | None = None, token: str | None = None) -> FetchResult:
    """Download OWNER/NAME[:FILE] from the Hub (its cache, then the network) and add it to the store.

    Without FILE the repository must hold exactly one *.kvmlx file. The downloaded file is verified
    exactly as `fetch` verifies (header, signature with `require_signed`, every tensor digest)."""
    from huggingface_hub import HfApi, hf_hub_download
    repo, filename = parse_hub_spec(spec)
    try:
        if filename is None:
            files = [f for f in HfApi(token=token).list_repo_files(repo, revision=revision) if f.endswith(OBJECT_SUFFIX)]
            if len(files) != 1:
                raise DistributionError(f"{repo} holds {len(files)} .kvmlx files; name one as {repo}:FILE")
            filename = files[0]
        local = hf_hub_download(repo, filename, revision=revision, token=token)
    except Exception as e:  # not found, offline without a cached copy, auth
        if isinstance(e, KvmlxError):
            raise
        raise DistributionError(f"pull {repo}:{filename or ''}: {type(e).__name__}: {_first_line(e)}") from None
    store = store if isinstance(store, Store) else Store(store)
    with Artifact(local) as art:
        digest = art.header_digest.hex()
    sig = trust_api.check_signature(local, require_signed, trust_list)
    key = store.add(local)
    return FetchResult(key, digest, store.path(key), os.path.getsize(local), 0, sig.to_json())


# ---------------------------------------------------------------- command line


def register_commands(group, json_out: Callable[[Any], None]) -> None:
    """Add serve-artifacts, fetch, token {issue,report}, push and pull to a Click group (kvmlx's `main`),
    printing `--json` output with `json_out` (the CLI's own)."""
    import click

    @group.command("serve-artifacts")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind (default: this machine only).")
    @click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
    @click.option("--price", "prices", multiple=True, metavar="DIGEST=USD",
                  help=f"Price per load (repeatable; also read from DIRECTORY/{PRICES_FILE}).")
    @click.option("--publisher-key", default=None, metavar="ed25519:...|FILE",
                  help="Public key whose tokens unlock priced artifacts (the server never holds the private key).")
    @click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
                  help=f"Metering log (JSON lines).  [default: DIRECTORY/{METERING_FILE}]")
    def serve_artifacts(directory, host, port, prices, publisher_key, log_path) -> None:
        """Serve the artifacts in DIRECTORY (a folder of .kvmlx files or a kvmlx store) over HTTP."""
        server = ArtifactServer(directory, prices=parse_prices(list(prices)), publisher_key=publisher_key, log=log_path)
        import uvicorn
        click.echo(f"serving {len(server.catalog)} artifacts on http://{host}:{port}/catalog", err=True)
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)

    @group.command("fetch")
    @click.argument("url")
    @click.option("--token", default=None, envvar="KVMLX_TOKEN", help="Access token for a priced artifact ($KVMLX_TOKEN).")
    @click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None, help="Store directory (default: $KVMLX_HOME/store).")
    @click.option("--require-signed", is_flag=True, help="Refuse the artifact unless signed by a key in your trust list.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def fetch_command(url, token, store_dir, require_signed, quiet, as_json) -> None:
        """Download an artifact (resuming a partial download) and add it to the local store, verified."""
        res = fetch(url, token=token, store=store_dir, require_signed=require_signed,
                    progress=not quiet and not as_json and sys.stderr.isatty())
        if as_json:
            json_out(res.to_json())
        else:
            click.echo(f"stored {res.key} ({res.path.stat().st_size:,} bytes; {res.bytes_downloaded:,} downloaded"
                       + (f", resumed at {res.resumed_from:,}" if res.resumed_from else "") + ")")

    @group.group("token")
    def token_group() -> None:
        """Issue access tokens for priced artifacts; report what the metering log says was sold."""

    @token_group.command("issue")
    @click.option("--artifact", "artifact", required=True, help="Header digest (hex) of the artifact, as in the catalog.")
    @click.option("--loads", type=click.IntRange(1), default=1, show_default=True, help="Full downloads the token allows.")
    @click.option("--expires", default="30d", show_default=True, help="Duration (90s, 15m, 12h, 30d), Unix time or ISO date.")
    @click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="The publisher's private key (default: the one `kvmlx keygen` wrote).")
    @click.option("--json", "as_json", is_flag=True, help="Print the token and its claims as JSON.")
    def token_issue(artifact, loads, expires, key_path, as_json) -> None:
        """Mint a signed access token for one artifact."""
        from ..cli import _ask_passphrase
        if not _DIGEST_RE.match(artifact.lower()):
            raise click.BadParameter("a 64-hex header digest, as in the catalog", param_hint="--artifact")
        key = trust_api.load_private_key(key_path or trust_api.default_key_path(), _ask_passphrase)
        try:
            exp = parse_expiry(expires)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--expires") from None
        tok = issue_token(key, artifact.lower(), loads, exp)
        if as_json:
            json_out({"token": tok, "claims": token_claims_unverified(tok)})
        else:
            click.echo(tok)

    @token_group.command("report")
    @click.option("--log", "log_path", type=click.Path(exists=True, dir_okay=False), required=True, help="The server's metering log.")
    @click.option("--prices", "prices_path", type=click.Path(exists=True, dir_okay=False), default=None, help="prices.json.")
    @click.option("--price", "prices", multiple=True, metavar="DIGEST=USD", help="Price per load (repeatable).")
    @click.option("--egress-per-gb", type=float, default=None, help="Egress $ per GB.  [default: kvmlx cost's 0.09]")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def token_report(log_path, prices_path, prices, egress_per_gb, as_json) -> None:
        """Per-artifact loads, bytes served, revenue and egress cost from a metering log."""
        p = load_prices(prices_path) if prices_path else {}
        p.update(parse_prices(list(prices)))
        rep = report(log_path, p, egress_per_gb=egress_per_gb)
        json_out(rep) if as_json else click.echo(format_report(rep))

    @group.command("push")
    @click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
    @click.option("--repo", required=True, help="Hub repository OWNER/NAME (created if missing).")
    @click.option("--path-in-repo", default=None, help="File name in the repository (default: the artifact's).")
    @click.option("--private", is_flag=True, help="Create the repository private.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def push_command(artifact, repo, path_in_repo, private, as_json) -> None:
        """Upload an artifact to the Hugging Face Hub."""
        res = push(artifact, repo, path_in_repo=path_in_repo, private=private)
        json_out(res) if as_json else click.echo(f"pushed {res['file']} to {repo} ({res['digest'][:16]})")

    @group.command("pull")
    @click.argument("spec", metavar="OWNER/NAME[:FILE]")
    @click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None, help="Store directory.")
    @click.option("--revision", default=None, help="Branch, tag or commit.")
    @click.option("--require-signed", is_flag=True, help="Refuse the artifact unless signed by a key in your trust list.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    def pull_command(spec, store_dir, revision, require_signed, as_json) -> None:
        """Download an artifact from the Hugging Face Hub into the local store, verified."""
        res = pull(spec, store=store_dir, require_signed=require_signed, revision=revision)
        json_out(res.to_json()) if as_json else click.echo(f"stored {res.key} from {spec}")


def _standalone():
    import click

    from ..cli import KvmlxGroup, _emit

    @click.group(cls=KvmlxGroup)
    def cli() -> None:
        """kvmlx distribution commands (also available as `kvmlx ...`)."""

    register_commands(cli, _emit)
    return cli


if __name__ == "__main__":
    _standalone()()
