"""Distribution: a real artifact server (uvicorn, subprocess, 127.0.0.1) and the real client against it.

Catalog, full/ranged/resumed downloads, 401/403, tokens used up, a tampered file refused, the metering
log's figures, and `kvmlx pull` through the Hub client's offline cache. Synthetic (model-free) artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from fuzz_corpus import synthetic_artifact
from kvmlx.serving.artifacts import PRICES_FILE, ArtifactServer
from kvmlx.serving.entitlements import (DistributionError, TokenError, issue_token, read_log, report, token_claims_unverified,
                                        verify_token)
from kvmlx.serving.fetch import fetch
from kvmlx.serving.hub import parse_hub_spec, pull, push
from kvmlx.artifact import trust as trust_api
from kvmlx.errors import IntegrityError, UntrustedPublisherError
from kvmlx.artifact.format import Artifact
from kvmlx.runtime.store import Store

PRICE = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(path: Path) -> str:
    with Artifact(path) as art:
        return art.header_digest.hex()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A served directory: a free artifact, a priced signed one, one to tamper with; the server's URL."""
    root = tmp_path_factory.mktemp("site")
    served = root / "served"
    served.mkdir()
    key = trust_api.generate_key()
    key_file = root / "publisher.pem"
    trust_api.write_private_key(key, key_file)  # 0600, plus publisher.pem.pub holding the public key id
    free = synthetic_artifact(served / "free.kvmlx", tokens=40, head_dim=64, seed=1)
    paid = synthetic_artifact(served / "paid.kvmlx", tokens=48, head_dim=64, seed=2, sign=trust_api.signer(key))
    victim = synthetic_artifact(served / "victim.kvmlx", tokens=56, head_dim=64, seed=3)
    digests = {name: _digest(p) for name, p in (("free", free), ("paid", paid), ("victim", victim))}
    (served / PRICES_FILE).write_text(json.dumps({digests["paid"]: PRICE}))
    log = root / "metering.jsonl"
    with _server(served, "--publisher-key", f"{key_file}.pub", "--log", str(log)) as url:
        yield {"url": url, "key": key, "key_file": key_file, "digests": digests, "paths": {"free": free, "paid": paid, "victim": victim},
               "log": log, "served": served}


@contextlib.contextmanager
def _server(directory: Path, *args: str):
    """`kvmlx serve-artifacts DIRECTORY` in a subprocess on a free 127.0.0.1 port; always terminated."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvmlx", "serve-artifacts", str(directory), "--port", str(port), *args],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _url(site, name: str) -> str:
    return f"{site['url']}/artifacts/{site['digests'][name]}"


def _token(site, name: str, loads: int = 1, expires: float | None = None) -> str:
    return issue_token(site["key"], site["digests"][name], loads, expires or time.time() + 3600)


def test_catalog_and_health(site):
    assert httpx.get(site["url"] + "/health").json() == {"status": "ok", "artifacts": 3}
    cat = httpx.get(site["url"] + "/catalog").json()
    by = {a["digest"]: a for a in cat["artifacts"]}
    assert set(by) == set(site["digests"].values())
    paid = by[site["digests"]["paid"]]
    assert paid["price_per_load_usd"] == PRICE and paid["publisher_key"] == trust_api.public_key_id(site["key"])
    assert paid["tokens"] == 48 and paid["bytes"] == site["paths"]["paid"].stat().st_size
    assert paid["model"] == "test" and paid["model_fingerprint"] == "blake3:00"
    free = by[site["digests"]["free"]]
    assert free["price_per_load_usd"] is None and free["publisher_key"] is None
    assert cat["publisher_key"] == trust_api.public_key_id(site["key"])


def test_full_and_ranged_download(site, tmp_path):
    data = site["paths"]["free"].read_bytes()
    url = _url(site, "free")
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data and r.headers["etag"] == f'"{site["digests"]["free"]}"'
    h = httpx.head(url)
    assert h.status_code == 200 and int(h.headers["content-length"]) == len(data) and h.headers["accept-ranges"] == "bytes"
    r = httpx.get(url, headers={"Range": "bytes=100-4195"})
    assert r.status_code == 206 and r.content == data[100:4196]
    assert r.headers["content-range"] == f"bytes 100-4195/{len(data)}"
    assert httpx.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    r = httpx.get(url, headers={"Range": "bytes=100-", "If-Range": '"something-else"'})
    assert r.status_code == 200 and r.content == data  # If-Range mismatch: the whole file
    assert httpx.get(site["url"] + "/artifacts/" + "0" * 64).status_code == 404
    # the client: into a store, verified, byte-identical
    store = Store(tmp_path / "store")
    res = fetch(url, store=store)
    assert res.resumed_from == 0 and res.bytes_downloaded == len(data)
    assert store.path(res.key).read_bytes() == data and store.get(res.key).num_tokens == 40
    assert not list(store.tmp.glob("fetch-*"))


def test_unauthorized_and_forbidden(site, tmp_path):
    url = _url(site, "paid")
    r = httpx.get(url)
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
    assert httpx.head(url).status_code == 401
    assert httpx.head(url, headers={"Authorization": "Bearer x.y"}).status_code == 403
    assert httpx.head(url, headers={"Authorization": f"Bearer {_token(site, 'paid')}"}).status_code == 200
    forged = issue_token(trust_api.generate_key(), site["digests"]["paid"], 5, time.time() + 3600)
    expired = _token(site, "paid", expires=time.time() - 1)
    other = _token(site, "free")
    for bad in (forged, expired, other, "garbage", "x.y", "a.b.c", _token(site, "paid")[:-4] + "AAAA"):
        r = httpx.get(url, headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 403, (bad, r.text)
    for bad in ("é.é", "", "." * 5000, "e30.AAAA"):
        with pytest.raises(TokenError):
            verify_token(bad, trust_api.parse_public_key(trust_api.public_key_id(site["key"])))
    with pytest.raises(DistributionError, match="401"):
        fetch(url, store=tmp_path / "s")
    with pytest.raises(DistributionError, match="403.*expired"):
        fetch(url, token=expired, store=tmp_path / "s")
    assert Store(tmp_path / "s").ls() == []


def test_tokens_resume_and_use_up(site, tmp_path):
    """2 loads: an interrupted download resumed (1 load), a second full one, then 403; all in the log."""
    url, tok = _url(site, "paid"), _token(site, "paid", loads=2)
    tid = token_claims_unverified(tok)["tid"]
    size = site["paths"]["paid"].stat().st_size
    store = Store(tmp_path / "a")

    class Cut(Exception):
        pass

    def cut(done, total):
        if done >= 32768:
            raise Cut

    with pytest.raises(Cut):
        fetch(url, token=tok, store=store, chunk_size=16384, on_chunk=cut)
    part = store.tmp / f"fetch-{site['digests']['paid']}" / "artifact.part"
    assert 32768 <= part.stat().st_size < size and store.ls() == []
    kept = part.stat().st_size
    res = fetch(url, token=tok, store=store, chunk_size=16384)
    assert res.resumed_from == kept  # a Range request from where the partial file ends
    assert res.resumed_from + res.bytes_downloaded == size
    assert store.path(res.key).read_bytes() == site["paths"]["paid"].read_bytes()
    fetch(url, token=tok, store=tmp_path / "b")  # the second load
    with pytest.raises(DistributionError, match="403.*used up"):
        fetch(url, token=tok, store=tmp_path / "c")
    # a resume-shaped request cannot get around the limit either, beyond the bounded slack
    r = httpx.get(url, headers={"Authorization": f"Bearer {tok}", "Range": "bytes=1-"})
    assert r.status_code == 403
    # a fresh token is a fresh start; the signature is checked against a trust list when required
    trusted = trust_api.TrustList(tmp_path / "trust.json")
    with pytest.raises(UntrustedPublisherError):
        fetch(url, token=_token(site, "paid"), store=tmp_path / "d", require_signed=True, trust_list=trusted)
    trusted.add(site["key"], "pub")
    res = fetch(url, token=_token(site, "paid"), store=tmp_path / "e", require_signed=True, trust_list=trusted)
    assert res.signature["trusted"] is True
    time.sleep(0.3)  # the server logs a response when it has finished sending it
    recs = [r for r in read_log(site["log"]) if r["token"] == tid]
    assert sum(r["load"] for r in recs) == 2
    resumes = [r for r in recs if not r["load"]]
    assert [r["start"] for r in resumes] == [kept] and resumes[0]["status"] == 206
    assert resumes[0]["bytes"] == size - kept


def test_tampered_file_refused(site, tmp_path):
    victim = site["paths"]["victim"]
    data = bytearray(victim.read_bytes())
    with Artifact(victim) as art:
        t = next(iter(art.tensors.values()))
        off = t.offset
    data[off] ^= 0xFF
    victim.write_bytes(bytes(data))  # the header (and its digest) unchanged: the server still offers it
    store = Store(tmp_path / "store")
    with pytest.raises(IntegrityError):
        fetch(_url(site, "victim"), store=store)
    assert store.ls() == [] and not list(store.objects.iterdir())
    assert not list(store.tmp.glob("fetch-*/artifact.part"))  # not kept to be "resumed"


def test_metering_report(site, tmp_path):
    """The report's figures, from the log the server wrote (during this test and the ones above)."""
    fetch(_url(site, "paid"), token=_token(site, "paid"), store=tmp_path / "s")
    fetch(_url(site, "free"), store=tmp_path / "s")
    time.sleep(0.3)
    recs = read_log(site["log"])
    paid = site["digests"]["paid"]
    rep = report(site["log"], {paid: PRICE}, egress_per_gb=0.1, bytes_per_gb=1e9)
    row = next(r for r in rep["artifacts"] if r["artifact"] == paid)
    paid_loads = sum(1 for r in recs if r["artifact"] == paid and r["load"] and r["token"])
    assert paid_loads >= 1 and row["paid_loads"] == paid_loads
    assert row["revenue_usd"] == pytest.approx(paid_loads * PRICE)
    nbytes = sum(r["bytes"] for r in recs if r["artifact"] == paid)
    assert row["bytes"] == nbytes and row["egress_cost_usd"] == pytest.approx(nbytes / 1e9 * 0.1)
    free = next(r for r in rep["artifacts"] if r["artifact"] == site["digests"]["free"])
    assert free["revenue_usd"] == 0 and free["loads"] >= 1
    assert all(set(r) >= {"when", "token", "artifact", "bytes"} for r in recs)
    # the CLI: token issue with the key file, token report
    from kvmlx.cli import main as cli

    out = CliRunner().invoke(cli, ["token", "issue", "--artifact", paid, "--loads", "3", "--expires", "1h",
                                   "--key", str(site["key_file"]), "--json"])
    assert out.exit_code == 0, out.output
    tok = json.loads(out.output)["token"]
    claims = verify_token(tok, trust_api.parse_public_key(trust_api.public_key_id(site["key"])), artifact=paid)
    assert claims["loads"] == 3 and claims["exp"] > time.time() + 3500
    out = CliRunner().invoke(cli, ["token", "report", "--log", str(site["log"]), "--price", f"{paid}={PRICE}", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["totals"]["revenue_usd"] == pytest.approx(paid_loads * PRICE)
    # nothing the server holds can mint a token: only the public key is on its command line and disk
    assert not any(p.suffix == ".pem" for p in site["served"].iterdir())


def test_priced_without_key_refused(tmp_path):
    a = synthetic_artifact(tmp_path / "a.kvmlx")
    with pytest.raises(DistributionError, match="publisher-key"):
        ArtifactServer(tmp_path, prices={_digest(a): 1.0})
    with pytest.raises(DistributionError, match="matches 0"):
        ArtifactServer(tmp_path, prices={"ab" * 32: 1.0}, publisher_key=trust_api.public_key_id(trust_api.generate_key()))


def test_unreachable_server_is_a_clean_error(tmp_path):
    with pytest.raises(DistributionError, match="ConnectError"):
        fetch(f"http://127.0.0.1:{_free_port()}/artifacts/{'ab' * 32}", store=tmp_path / "s", timeout=5)
    with pytest.raises(DistributionError, match="not an artifact URL"):
        fetch("http://127.0.0.1:1/catalog", store=tmp_path / "s")


def test_pull_from_hub_cache(tmp_path, monkeypatch):
    """`pull` through huggingface_hub's real hf_hub_download, served from its cache layout offline."""
    art = synthetic_artifact(tmp_path / "doc.kvmlx", seed=7)
    cache = tmp_path / "hub"
    commit = "a" * 40
    repo_dir = cache / "models--alice--kv"
    blob = repo_dir / "blobs" / "deadbeef"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(art.read_bytes())
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "doc.kvmlx").symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    res = pull("alice/kv:doc.kvmlx", store=tmp_path / "store")
    assert Store(tmp_path / "store").path(res.key).read_bytes() == art.read_bytes()
    with pytest.raises(DistributionError):
        parse_hub_spec("../etc:x")


@pytest.fixture
def fake_hub(monkeypatch):
    """A local Starlette app answering the few Hub HTTP calls push and pull make (create repo, preupload,
    commit with inline base64 content, resolve, tree), on 127.0.0.1, with HF_ENDPOINT pointed at it."""
    import base64
    import hashlib
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    files: dict[tuple[str, str], bytes] = {}
    calls: list[tuple[str, str]] = []
    commit = "c" * 40

    async def handle(request):
        p, body = request.url.path, await request.body()
        calls.append((request.method, p))
        if p == "/api/validate-yaml":  # the client checks a README's metadata before committing it
            return JSONResponse({})
        if p == "/api/repos/create":
            d = json.loads(body)
            return JSONResponse({"url": f"{base}/{d['organization']}/{d['name']}"})
        parts = p.strip("/").split("/")
        if p.startswith("/api/models/") and "/preupload/" in p:
            return JSONResponse({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                           for f in json.loads(body)["files"]]})
        if p.startswith("/api/models/") and "/commit/" in p:
            repo = "/".join(parts[2:4])
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    files[(repo, op["value"]["path"])] = base64.b64decode(op["value"]["content"])
            return JSONResponse({"commitUrl": f"{base}/{repo}/commit/{commit}", "commitOid": commit})
        if p.startswith("/api/models/") and "/tree/" in p:
            repo = "/".join(parts[2:4])
            return JSONResponse([{"type": "file", "path": f, "oid": "0" * 40, "size": len(b)} for (r, f), b in files.items() if r == repo])
        if len(parts) >= 5 and parts[2] == "resolve":
            key = ("/".join(parts[:2]), "/".join(parts[4:]))
            if key not in files:
                return Response(status_code=404, headers={"x-error-code": "EntryNotFound"})
            data = files[key]
            h = {"x-repo-commit": commit, "etag": f'"{hashlib.sha1(data).hexdigest()}"', "content-length": str(len(data))}
            return Response(b"" if request.method == "HEAD" else data, headers=h)
        return JSONResponse({"error": "not emulated"}, status_code=404)

    app = Starlette(routes=[Route("/{p:path}", handle, methods=["GET", "HEAD", "POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setattr(c, "ENDPOINT", base)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", base + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_real_token")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(Path(os.environ["KVMLX_HOME"]) / f"hub-{port}"))
    try:
        yield {"files": files, "calls": calls}
    finally:
        server.should_exit = True
        thread.join(10)


def test_push_and_pull_through_emulated_hub(fake_hub, tmp_path):
    art = synthetic_artifact(tmp_path / "doc.kvmlx", seed=11)
    res = push(art, "alice/kvdocs")
    assert res["digest"] == _digest(art) and fake_hub["files"][("alice/kvdocs", "doc.kvmlx")] == art.read_bytes()
    pulled = pull("alice/kvdocs", store=tmp_path / "store")  # no FILE: the one .kvmlx in the repo
    assert Store(tmp_path / "store").path(pulled.key).read_bytes() == art.read_bytes()
    assert ("POST", "/api/models/alice/kvdocs/commit/main") in fake_hub["calls"]
    assert any(m == "GET" and "/resolve/" in p for m, p in fake_hub["calls"])
    with pytest.raises(DistributionError, match="missing.kvmlx"):
        pull("alice/kvdocs:missing.kvmlx", store=tmp_path / "store")


def test_fetched_artifact_generates(tiny, document, tmp_path):
    """A tiny-model artifact served, fetched by the `fetch` command into a store, then generated from:
    the same tokens as from the publisher's own file."""
    from kvmlx.runtime.generate import generate
    from kvmlx.runtime.publish import publish

    served = tmp_path / "served"
    served.mkdir()
    text = document[:400]
    publish(tiny, text, served / "doc.kvmlx")
    digest = _digest(served / "doc.kvmlx")
    with _server(served) as url:
        out = subprocess.run([sys.executable, "-m", "kvmlx", "fetch", f"{url}/artifacts/{digest}",
                              "--store", str(tmp_path / "store"), "--json"],
                             env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    store = Store(tmp_path / "store")
    assert store.get(res["key"]) is not None and res["digest"] == digest
    mine, _ = generate(served / "doc.kvmlx", tiny, " The", max_tokens=8)
    theirs, _ = generate(store.path(res["key"]), tiny, " The", max_tokens=8)
    assert theirs.tokens == mine.tokens


def test_push_writes_a_model_card(fake_hub, tmp_path, tiny, document):
    """README.md with Hub metadata: base_model (hub ids only), tags, tokens, dtype, fingerprints, signature."""
    import yaml

    from kvmlx.artifact import trust as trust_api
    from kvmlx.artifact.format import read_header
    from kvmlx.runtime.publish import publish

    key = trust_api.generate_key()
    art = tmp_path / "doc.kvmlx"
    publish(tiny, document[:300], art, sign=trust_api.signer(key))
    push(art, "alice/card")
    card = fake_hub["files"][("alice/card", "README.md")].decode()
    meta = yaml.safe_load(card.split("---")[1])
    h = read_header(art)
    assert "kvmlx" in meta["tags"] and "base_model" not in meta  # builtin:tiny is not a Hub model
    k = meta["kvmlx"]
    assert k["tokens"] == h["kv"]["num_tokens"] and k["dtype"] == "bfloat16" and k["header_digest"] == _digest(art)
    assert k["model_fingerprint"] == h["model"]["fingerprint"] and k["tokenizer_fingerprint"] == h["tokenizer"]["fingerprint"]
    assert k["signed_by"] == trust_api.public_key_id(key) and "signed by" in card
    from kvmlx.serving.hub import model_card
    hub = model_card({**h, "model": {**h["model"], "id": "Qwen/Qwen3-4B"}}, "d" * 64,
                     trust_api.SignatureStatus(False), "x.kvmlx", "a/b")
    assert yaml.safe_load(hub.split("---")[1])["base_model"] == "Qwen/Qwen3-4B" and "unsigned" in hub
    assert k["cache_families"] == ["kv"] and k["format_version"] == 3


def test_model_card_of_a_version_2_artifact_names_its_families(fake_hub, tmp_path, preset):
    import yaml

    from kvmlx.runtime.publish import publish

    lm = preset("sliding")
    art = tmp_path / "sliding.kvmlx"
    publish(lm, lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:40], art, chunk_size=8,
            checkpoint_every=16)
    push(art, "alice/sliding")
    card = fake_hub["files"][("alice/sliding", "README.md")].decode()
    k = yaml.safe_load(card.split("---")[1])["kvmlx"]
    assert k["format_version"] == 3 and k["cache_families"] == ["rotating", "kv"]
    assert "| caches | rotating, kv, state checkpoints every 16 tokens |" in card
