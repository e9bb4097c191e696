"""Entitlements: who may download a priced artifact, and what was sold. Owns the access tokens
(Ed25519-signed claims: issue, verify, read; durations and expiries), the prices per load, the
metering log (one JSON line per served response) and the report built from it (loads, revenue,
egress cost). Also `DistributionError`, shared by the artifact server, the fetch client and the Hub
commands. docs/DISTRIBUTION.md has the token format and how loads are counted.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from ..errors import KvmlxError
from ..artifact.format import canonical_json
from ..artifact import trust as trust_api

TOKEN_VERSION = 1
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
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
    if not DIGEST_RE.match(artifact):
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



# ---------------------------------------------------------------- prices


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


# ---------------------------------------------------------------- metering


class Meter:
    """The metering log: JSON lines, appended under `flock` and fsync'ed, safe from several processes.

    One line per served response: {"when", "token", "artifact", "bytes", "start", "load", "status"}.
    `load` is true for a response that starts at byte 0 under a token (a new download); resumes
    (start > 0) are logged with their bytes but are not loads. The log is the export `report` reads;
    what a token may still spend is kept in the SQLite ledger (kvmlx.serving.ledger).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

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


def read_log(path: str | os.PathLike, *, strict: bool = False) -> list[dict]:
    """The metering log's records (a missing log has none). A torn last line (a crash mid-append) is
    skipped; with `strict`, a file that is not UTF-8 JSON lines of objects is a DistributionError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DistributionError(f"{path}: cannot read the metering log ({e.strerror or e})") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        if strict:
            raise DistributionError(f"{path}: not a metering log (not UTF-8 text at byte {e.start})") from None
        lines = data.decode("utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif strict and line.strip() and i < len(lines) - 1:  # only the last line may be torn
            raise DistributionError(f"{path}: not a metering log (line {i + 1} is not a JSON object)")
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
    for rec in read_log(log, strict=True):
        art = rec.get("artifact")
        if not isinstance(art, str) or not isinstance(rec.get("bytes", 0), int):
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
