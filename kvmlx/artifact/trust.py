"""Publisher signatures and the local trust list.

An artifact's signature block (docs/FORMAT.md) holds an Ed25519 public key and its signature of the
32-byte header digest. The header holds every tensor's digest, the token ids and the model and
tokenizer fingerprints, so one signature covers the whole artifact. This module:

- makes and stores keys: `generate_key`, `write_private_key` (0600, PEM/PKCS#8, optionally
  passphrase-encrypted, or the raw 32-byte seed), `load_private_key`, `signer` / `signer_from_file`
  (the `sign=` callable `kvmlx.artifact.format.write_artifact` and `kvmlx.runtime.publish.publish` take);
- names public keys with a short text id, ``ed25519:`` + unpadded URL-safe base64 of the 32 raw
  bytes (`public_key_id`, `parse_public_key`, which also accepts 64 hex digits);
- keeps a local trust list (`TrustList`, ``trust.json`` in `config_dir()`), written atomically
  under a lock;
- checks an artifact's signature at load (`check_signature`), raising typed errors.

All cryptography is the `cryptography` package's Ed25519; nothing here is hand-rolled.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Union

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import (
    ArtifactError,
    BadSignatureError,
    KeyFileError,
    TrustListError,
    UnsignedArtifactError,
    UntrustedPublisherError,
)
from .format import Artifact, Signer

KEY_PREFIX = "ed25519:"
TRUST_FILE = "trust.json"
TRUST_VERSION = 1
PASSPHRASE_ENV = "KVMLX_KEY_PASSPHRASE"
MAX_KEY_FILE_BYTES = 64 << 10  # a PEM Ed25519 key is ~120 bytes; anything large is not a key
MAX_TRUST_FILE_BYTES = 16 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$")

Passphrase = Union[str, bytes, None, Callable[[], Union[str, bytes, None]]]


# ---------------------------------------------------------------- locations


def config_dir() -> Path:
    """Where keys and the trust list live: $KVMLX_HOME if set, else $XDG_CONFIG_HOME/kvmlx or ~/.config/kvmlx.

    Not the model cache (~/.cache/kvmlx): a cache may be wiped at any time, and a trust list or a
    private key must not disappear with it.
    """
    if home := os.environ.get("KVMLX_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kvmlx"


def default_key_path() -> Path:
    """Where `kvmlx keygen` writes a key when no --out is given."""
    return config_dir() / "keys" / "publisher.pem"


def trust_list_path() -> Path:
    return config_dir() / TRUST_FILE


# ---------------------------------------------------------------- public key ids


def _crypto():
    """cryptography's Ed25519 module, its serialization module and InvalidSignature, imported on first
    use: ~7 MB and ~10 ms that a command loading an unsigned artifact never needs."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519, serialization, InvalidSignature


def _raw_public(key: bytes | Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        if len(key) == 32:
            return bytes(key)
        raise KeyFileError("an Ed25519 public key is 32 bytes")
    ed, serialization, _ = _crypto()
    if isinstance(key, ed.Ed25519PrivateKey):
        key = key.public_key()
    if isinstance(key, ed.Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise KeyFileError("an Ed25519 public key is 32 bytes")


def public_key_id(key: bytes | Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The short text id of a public key: ``ed25519:`` + 43 characters of unpadded URL-safe base64."""
    return KEY_PREFIX + base64.urlsafe_b64encode(_raw_public(key)).decode().rstrip("=")


def parse_public_key(text: str) -> bytes:
    """The 32 raw bytes of a public key id (``ed25519:`` + base64 or 64 hex digits); KeyFileError otherwise."""
    s = text.strip()
    if not s.startswith(KEY_PREFIX):
        raise KeyFileError(f"not a public key id (expected {KEY_PREFIX}...): {_short(s)}")
    body = s[len(KEY_PREFIX):]
    raw: bytes | None = None
    if re.fullmatch(r"[0-9a-fA-F]{64}", body):
        raw = bytes.fromhex(body)
    elif re.fullmatch(r"[A-Za-z0-9_+/-]{43}=?", body):
        try:
            raw = base64.b64decode(body.rstrip("=").replace("-", "+").replace("_", "/") + "=", validate=True)
        except binascii.Error:
            raw = None
    if raw is None or len(raw) != 32 or not any(raw):
        raise KeyFileError(f"malformed public key id {_short(s)} (expected {KEY_PREFIX} + 43 base64 or 64 hex characters)")
    try:
        _crypto()[0].Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise KeyFileError(f"{_short(s)} is not a valid Ed25519 public key") from None
    return raw


def default_name(key_id: str) -> str:
    """A trusted key's name when none is given: the id's first 8 base64url characters, prefixed with
    ``key-`` when they start with ``_`` or ``-`` (1 key in 32), which a name may not start with."""
    short = key_id[len(KEY_PREFIX): len(KEY_PREFIX) + 8]
    return short if _NAME.match(short) else f"key-{short}"


def _short(s: str, n: int = 60) -> str:
    """A value safe to put in a one-line message (printable, bounded)."""
    s = "".join(c if c.isprintable() else "?" for c in str(s))
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------- private keys


def generate_key() -> Ed25519PrivateKey:
    return _crypto()[0].Ed25519PrivateKey.generate()


def _passphrase_bytes(passphrase: Passphrase) -> bytes | None:
    if callable(passphrase):
        passphrase = passphrase()
    if passphrase is None or passphrase == "" or passphrase == b"":
        return None
    return passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)


def encode_private_key(key: Ed25519PrivateKey, *, encoding: str = "pem", passphrase: Passphrase = None) -> bytes:
    """PEM (PKCS#8, encrypted with the best available scheme when a passphrase is given) or the raw 32-byte seed."""
    secret = _passphrase_bytes(passphrase)
    serialization = _crypto()[1]
    if encoding == "raw":
        if secret is not None:
            raise KeyFileError("a raw key file cannot be passphrase-protected; use the PEM encoding")
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    if encoding != "pem":
        raise KeyFileError(f"unknown key encoding {_short(encoding)} (pem or raw)")
    protection = serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, protection)


def write_private_key(
    key: Ed25519PrivateKey,
    path: str | os.PathLike,
    *,
    encoding: str = "pem",
    passphrase: Passphrase = None,
    overwrite: bool = False,
) -> Path:
    """Write a private key readable by its owner only (0600 from creation), plus ``<path>.pub`` with its id.

    The key is written to a 0600 temp file in the same directory, fsynced, then linked into place, so
    `path` never holds a partial key and an existing key is never replaced unless `overwrite`.
    """
    path = Path(path)
    data = encode_private_key(key, encoding=encoding, passphrase=passphrase)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (pass --force to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_write(path, data, mode=0o600, exclusive=not overwrite)
        _atomic_write(Path(f"{path}.pub"), (public_key_id(key) + "\n").encode(), mode=0o644)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot write the key ({e.strerror or e})") from None
    return path


def _atomic_write(path: Path, data: bytes, *, mode: int, exclusive: bool = False) -> None:
    """Write `data` to a same-directory temp file created with `mode`, fsync, then move it to `path`.

    With `exclusive`, the final step is a hard link, which fails if `path` appeared meanwhile.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_private_key(path: str | os.PathLike, passphrase: Passphrase = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key file (PEM/PKCS#8, possibly encrypted, or a raw 32-byte seed).

    `passphrase` may be a callable, called only when the file is encrypted; when it is None,
    $KVMLX_KEY_PASSPHRASE is used. On POSIX a key file readable by group or others is refused
    (as ssh does): a leaked publisher key lets anyone sign KV in the publisher's name.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        if os.name == "posix" and st.st_mode & 0o077:
            raise KeyFileError(f"{path}: private key is readable by others (mode {st.st_mode & 0o777:o}); run chmod 600 {path}")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{path}: {st.st_size} bytes is not an Ed25519 key file")
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key ({e.strerror or e})") from None
    ed, serialization, _ = _crypto()
    if data.lstrip().startswith(b"-----BEGIN"):
        encrypted = b"ENCRYPTED" in data.lstrip().split(b"\n", 1)[0]
        secret = None
        if encrypted:
            secret = _passphrase_bytes(passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV))
            if secret is None:
                raise KeyFileError(f"{path}: key is passphrase-protected; give the passphrase (or set ${PASSPHRASE_ENV})")
        try:
            key = serialization.load_pem_private_key(data, password=secret)
        except (ValueError, TypeError) as e:
            reason = "wrong passphrase or corrupt key" if encrypted else f"not a readable PEM private key ({type(e).__name__})"
            raise KeyFileError(f"{path}: {reason}") from None
        except Exception as e:  # cryptography raises its own types for unsupported algorithms
            raise KeyFileError(f"{path}: unreadable key ({type(e).__name__})") from None
        if not isinstance(key, ed.Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__}); kvmlx signs with Ed25519 only")
        return key
    if len(data) == 32:
        return ed.Ed25519PrivateKey.from_private_bytes(data)
    raise KeyFileError(f"{path}: not an Ed25519 key file (expected PEM or 32 raw bytes)")


def signer(key: Ed25519PrivateKey) -> Signer:
    """The `sign=` callable for `write_artifact`/`publish`: header digest -> (raw public key, signature)."""
    public = _raw_public(key)

    def sign(header_digest: bytes) -> tuple[bytes, bytes]:
        return public, key.sign(header_digest)

    return sign


def signer_from_file(path: str | os.PathLike, passphrase: Passphrase = None) -> Signer:
    return signer(load_private_key(path, passphrase))


# ---------------------------------------------------------------- verification


def verify_signature(public_key: bytes, signature: bytes, header_digest: bytes) -> None:
    """Raise BadSignatureError unless `signature` is `public_key`'s Ed25519 signature of `header_digest`."""
    ed, _, invalid = _crypto()
    try:
        ed.Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), bytes(header_digest))
    except (invalid, ValueError):
        raise BadSignatureError(
            f"signature does not verify for key {public_key_id(public_key) if len(public_key) == 32 else '(malformed)'}: "
            "the header was altered after signing, or signed with another key"
        ) from None


@dataclass(frozen=True)
class SignatureStatus:
    """What `check_signature` found. `trusted` is None when no trust list was consulted."""

    signed: bool
    public_key: str | None = None
    trusted: bool | None = None
    name: str | None = None

    def to_json(self) -> dict:
        return {"signed": self.signed, "public_key": self.public_key, "trusted": self.trusted, "name": self.name}

    def describe(self) -> str:
        if not self.signed:
            return "unsigned"
        who = f"signed by {self.public_key}"
        if self.trusted is None:
            return f"{who} (valid signature; trust not checked)"
        return f"{who} (valid signature; trusted as {self.name!r})" if self.trusted else f"{who} (valid signature; NOT in the trust list)"


def check_signature(
    artifact: Artifact | str | os.PathLike,
    require_signed: bool = False,
    trust_list: "TrustList | None" = None,
) -> SignatureStatus:
    """Check an artifact's signature; with `require_signed`, also that its key is in the trust list.

    - A signature that is present is always verified: a bad one raises BadSignatureError, required or not.
    - `require_signed`: an unsigned artifact raises UnsignedArtifactError, and a valid signature by a key
      not in `trust_list` (default: the local trust list) raises UntrustedPublisherError.
    - Without `require_signed`, trust is looked up only when a `trust_list` is given, and reported.
    Call it before using anything the header says (which model to load, which tokens it claims).
    """
    if not isinstance(artifact, Artifact):
        with Artifact(artifact) as art:
            return check_signature(art, require_signed, trust_list)
    name = artifact.path.name
    if artifact.signature is None:
        if require_signed:
            raise UnsignedArtifactError(f"{name}: artifact is not signed and a signed artifact is required (--require-signed)")
        return SignatureStatus(False)
    public, signature = artifact.signature
    if not any(public):
        raise BadSignatureError(f"{name}: the signed flag is set but the signature block holds no key (all zeros)")
    try:
        verify_signature(public, signature, artifact.header_digest)
    except BadSignatureError as e:
        raise BadSignatureError(f"{name}: {e}") from None
    key_id = public_key_id(public)
    if trust_list is None and not require_signed:
        return SignatureStatus(True, key_id)
    trust = trust_list if trust_list is not None else TrustList.load()
    entry = trust.find(public)
    if entry is None:
        if require_signed:
            raise UntrustedPublisherError(
                f"{name}: signed by {key_id}, which is not in your trust list ({trust.path}); "
                f"if you trust this publisher: kvmlx trust add {key_id} --name NAME"
            )
        return SignatureStatus(True, key_id, False)
    return SignatureStatus(True, key_id, True, entry.name)


# ---------------------------------------------------------------- trust list


@dataclass(frozen=True)
class TrustEntry:
    key: str  # public key id, ed25519:...
    name: str
    added: str  # UTC, ISO 8601

    def to_json(self) -> dict:
        return {"key": self.key, "name": self.name, "added": self.added}


class TrustList:
    """The publishers this user trusts: ``{"version": 1, "keys": [{"key", "name", "added"}]}`` in trust.json.

    Changes are read-modify-write under an exclusive lock (``trust.json.lock``) and written atomically
    (temp file, fsync, rename), so concurrent `kvmlx trust add` calls neither lose an entry nor leave a
    torn file. A malformed file is an error, never silently treated as empty: the trust list fails closed.
    """

    def __init__(self, path: str | os.PathLike | None = None, entries: list[TrustEntry] | None = None):
        self.path = Path(path) if path is not None else trust_list_path()
        self.entries: list[TrustEntry] = list(entries or [])

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "TrustList":
        trust = cls(path)
        trust.entries = _read_entries(trust.path)
        return trust

    def find(self, key: bytes | str) -> TrustEntry | None:
        key_id = public_key_id(key) if isinstance(key, (bytes, bytearray)) else public_key_id(parse_public_key(key))
        return next((e for e in self.entries if e.key == key_id), None)

    def resolve(self, key_or_name: str) -> TrustEntry | None:
        if key_or_name.strip().startswith(KEY_PREFIX):
            return self.find(key_or_name)
        return next((e for e in self.entries if e.name == key_or_name), None)

    def add(self, key: str | bytes, name: str | None = None) -> TrustEntry:
        """Trust a public key (idempotent for the same key and name); returns its entry."""
        raw = parse_public_key(key) if isinstance(key, str) else _raw_public(key)
        key_id = public_key_id(raw)
        name = default_name(key_id) if name is None else name
        if not _NAME.match(name) or name.startswith(KEY_PREFIX):
            raise TrustListError(f"invalid name {_short(name)!r}: 1-64 letters, digits, space or _.@+- (not starting with a symbol)")
        with self._locked():
            self.entries = _read_entries(self.path)
            for e in self.entries:
                if e.name == name and e.key != key_id:
                    raise TrustListError(f"the name {name!r} is already used for {e.key}")
            existing = next((e for e in self.entries if e.key == key_id), None)
            entry = TrustEntry(key_id, name, existing.added if existing else _now())
            self.entries = [e for e in self.entries if e.key != key_id] + [entry]
            self._save()
        return entry

    def remove(self, key_or_name: str) -> TrustEntry:
        """Stop trusting a key, given its id or its name; TrustListError if it is not listed."""
        with self._locked():
            self.entries = _read_entries(self.path)
            entry = self.resolve(key_or_name)
            if entry is None:
                raise TrustListError(f"{_short(key_or_name)} is not in the trust list ({self.path})")
            self.entries = [e for e in self.entries if e.key != entry.key]
            self._save()
        return entry

    def to_json(self) -> dict:
        return {"version": TRUST_VERSION, "keys": [e.to_json() for e in self.entries]}

    def _save(self) -> None:
        try:
            _atomic_write(self.path, json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n", mode=0o644)
        except OSError as e:
            raise TrustListError(f"{self.path}: cannot write the trust list ({e.strerror or e})") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            import fcntl
        except ImportError:  # Windows: no advisory locks; the atomic rename still prevents torn files
            yield
            return
        except OSError as e:
            raise TrustListError(f"{self.path.parent}: cannot create it ({e.strerror or e})") from None
        try:
            lock = open(f"{self.path}.lock", "a")
        except OSError as e:
            raise TrustListError(f"{self.path}: cannot lock the trust list ({e.strerror or e})") from None
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_entries(path: Path) -> list[TrustEntry]:
    try:
        if path.stat().st_size > MAX_TRUST_FILE_BYTES:
            raise TrustListError(f"{path}: trust list is implausibly large")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise TrustListError(f"{path}: cannot read the trust list ({e.strerror or e})") from None
    except (ValueError, RecursionError):
        raise TrustListError(f"{path}: trust list is not valid JSON; fix or remove it") from None
    if not isinstance(data, dict) or data.get("version") != TRUST_VERSION or not isinstance(data.get("keys"), list):
        raise TrustListError(f"{path}: not a version-{TRUST_VERSION} kvmlx trust list")
    entries = []
    for item in data["keys"]:
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("key", "name", "added"))):
            raise TrustListError(f"{path}: malformed trust list entry")
        try:
            key_id = public_key_id(parse_public_key(item["key"]))
        except KeyFileError as e:
            raise TrustListError(f"{path}: {e}") from None
        entries.append(TrustEntry(key_id, item["name"], item["added"]))
    return entries


# ---------------------------------------------------------------- model ids from untrusted headers


def model_spec_from_header(header: dict) -> str:
    """The model id an artifact names, if it is safe to load without the user naming it.

    An artifact's header is attacker-controlled until its signature is checked, and even a signed one
    is the publisher's word: `kvmlx generate ARTIFACT` without --model would otherwise load whatever
    local path or hub repository the file names. Built-in ids and plain ``owner/name`` hub ids pass;
    absolute or home-relative paths, ``..`` components, and anything not printable are refused
    (pass --model to load such a model deliberately).
    """
    spec = header["model"]["id"]
    if re.fullmatch(r"builtin:[a-z0-9_-]{1,32}", spec):
        return spec
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}", spec) and ".." not in spec:
        return spec
    raise ArtifactError(f"artifact names the model {_short(spec)!r}, which is not a built-in or owner/name hub id; pass --model to choose the model yourself")
