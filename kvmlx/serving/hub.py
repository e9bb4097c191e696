"""Hugging Face Hub: `push` an artifact to a Hub repository and `pull` OWNER/NAME[:FILE] from it (its
cache, then the network) into the local store, verified exactly as `fetch` verifies. Owns
parse_hub_spec; Hub errors become DistributionError.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import KvmlxError
from ..artifact.format import Artifact
from ..artifact.layers import families
from ..runtime.store import OBJECT_SUFFIX, Store
from ..artifact import trust as trust_api
from .entitlements import DistributionError
from .fetch import FetchResult


def push(artifact: str | os.PathLike, repo: str, *, path_in_repo: str | None = None, token: str | None = None,
         private: bool = False, revision: str | None = None, create: bool = True, card: bool = True) -> dict:
    """Upload an artifact to a Hub repository (created if missing) as `path_in_repo` (default: its file
    name), and with `card` a README.md model card saying what it is and which model can use it."""
    from huggingface_hub import CommitOperationAdd, HfApi
    path = Path(artifact)
    with Artifact(path) as art:  # never upload a file that is not an artifact
        digest = art.header_digest.hex()
        signature = trust_api.check_signature(art)  # a bad signature is refused, never published
        header = art.header
    api = HfApi(token=token)
    name = path_in_repo or path.name
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))]
    if card:
        text = model_card(header, digest, signature, name, repo)
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode("utf-8")))
    try:
        if create:
            api.create_repo(repo, private=private, exist_ok=True)
        info = api.create_commit(repo_id=repo, operations=ops, revision=revision,
                                 commit_message=f"kvmlx artifact {digest[:16]}")
    except Exception as e:  # huggingface_hub's HTTP, auth and validation errors
        if isinstance(e, KvmlxError):
            raise
        raise DistributionError(f"push to {repo}: {type(e).__name__}: {_first_line(e)}") from None
    return {"repo": repo, "file": name, "digest": digest, "commit": str(getattr(info, "oid", "") or info)}


def model_card(header: dict, digest: str, signature, file_name: str, repo: str) -> str:
    """README.md for a Hub repository holding an artifact: YAML metadata the Hub indexes (`base_model`,
    `tags`, `library_name`, and a `kvmlx` block: tokens, dtype, encoding, fingerprints, header digest,
    signature), then what the file is and how to use it. Values are JSON strings (valid YAML)."""
    m, kv = header["model"], header["kv"]
    hub_id = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", m["id"]) is not None
    signed_by = signature.public_key if signature.signed else None
    meta = {
        "tokens": kv["num_tokens"], "dtype": kv["dtype"], "encoding": kv.get("encoding", "raw"),
        "lossless": kv.get("lossless", True), "chunk_size": kv["chunk_size"], "model_id": m["id"],
        "model_fingerprint": m["fingerprint"], "tokenizer_fingerprint": header["tokenizer"]["fingerprint"],
        "header_digest": digest, "file": file_name, "file_bytes": header["file_bytes"], "signed_by": signed_by,
        "format_version": header["version"], "cache_families": families(header),
    }
    j = json.dumps
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {j(m['id'])}")
    lines += ["library_name: kvmlx", "tags:", "- kvmlx", "- kv-cache", "- mlx", f"- {j(m['model_type'])}", "kvmlx:"]
    lines += [f"  {k}: {j(v)}" for k, v in meta.items()]
    lines.append("---")
    who = f"signed by `{signed_by}`" if signed_by else "unsigned"
    lines += [
        "", f"# KV cache of a {kv['num_tokens']}-token document for {m['id']}", "",
        f"`{file_name}` is a [kvmlx](https://github.com/) artifact: the prefilled KV cache of one document, so an agent "
        "loads it and continues token-exactly instead of running prefill.", "",
        "| | |", "|---|---|",
        f"| model | `{m['id']}` ({m['model_type']}, {m['num_layers']} layers, {m['num_kv_heads']} KV heads, head_dim {m['head_dim']}) |",
        f"| tokens | {kv['num_tokens']} |",
        f"| caches | {', '.join(meta['cache_families'])}"
        + (f", state checkpoints every {kv.get('checkpoint_every')} tokens" if header.get("checkpoints") else "") + " |",
        f"| KV dtype, encoding | {kv['dtype']}, {meta['encoding']}{'' if meta['lossless'] else ' (lossy: not token-exact)'} |",
        f"| model fingerprint | `{m['fingerprint']}` |",
        f"| tokenizer fingerprint | `{header['tokenizer']['fingerprint']}` |",
        f"| header digest | `{digest}` |",
        f"| signature | {who} |",
        f"| size | {header['file_bytes']:,} bytes |", "",
        "Only a model with exactly these fingerprints can load it; any other is refused by name.", "",
        "```bash",
        f"kvmlx pull {repo}:{file_name}" + ("   # then: kvmlx trust add " + signed_by + " --name NAME" if signed_by else ""),
        f"kvmlx generate --model {m['id']} --prompt \"$(cat document.txt) Question: ...\"",
        "```", "",
    ]
    return "\n".join(lines)


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
