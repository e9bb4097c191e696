"""Hugging Face Hub: `push` an artifact to a Hub repository and `pull` OWNER/NAME[:FILE] from it (its
cache, then the network) into the local store, verified exactly as `fetch` verifies. Owns
parse_hub_spec; Hub errors become DistributionError.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import KvmlxError
from ..artifact.format import Artifact
from ..runtime.store import OBJECT_SUFFIX, Store
from ..artifact import trust as trust_api
from .entitlements import DistributionError
from .fetch import FetchResult


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
