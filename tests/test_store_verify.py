"""Verification that persists: a store records the identity of each file it verified, so a load in a
new process hashes nothing while the file is unchanged; `store verify` re-hashes everything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmlx.artifact import format as fmt
from kvmlx.artifact.format import Artifact, forget_verified
from kvmlx.cli import main
from kvmlx.runtime.agent import Agent
from kvmlx.runtime.publish import publish
from kvmlx.runtime.store import Store

DOC = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture()
def hashes(monkeypatch):
    """Counts every tensor digest computed (both read paths end in Artifact._check_digest)."""
    seen = []
    real = Artifact._check_digest
    monkeypatch.setattr(Artifact, "_check_digest", lambda self, name, got: (seen.append(name), real(self, name, got))[1])
    return seen


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_publish_add_record_the_identity(tiny, tmp_path):
    store = Store(tmp_path / "s")
    pub = store.publish(tiny, DOC, chunk_size=32)
    with Artifact(pub.entry.path) as art:
        assert store.verified_identity(pub.key) == art.identity
    loose = tmp_path / "loose.kvmlx"
    publish(tiny, DOC + " more", loose, chunk_size=32)
    key = store.add(loose)
    with Artifact(store.path(key)) as art:
        assert store.verified_identity(key) == art.identity


def test_a_new_process_load_of_an_unchanged_entry_hashes_nothing(tiny, tmp_path, hashes):
    store = Store(tmp_path / "s")
    key = store.publish(tiny, DOC, chunk_size=32).key
    forget_verified()  # what a new process starts with
    hashes.clear()
    loaded = Store(tmp_path / "s").load(key, tiny)
    assert loaded.digests == "recorded" and hashes == []
    # a loose file keeps today's rule: hashed at its first load in a process
    loose = tmp_path / "loose.kvmlx"
    publish(tiny, DOC, loose, chunk_size=32)
    from kvmlx.runtime.load import load_artifact
    assert load_artifact(loose, tiny).digests == "hashed" and len(hashes) == 2 * 4 + 1


def test_a_written_file_is_hashed_again_and_a_flip_is_caught(tiny, tmp_path, hashes):
    store = Store(tmp_path / "s")
    key = store.publish(tiny, DOC, chunk_size=32).key
    path = store.path(key)
    path.write_bytes(path.read_bytes())  # same bytes, new ctime: the record no longer matches
    forget_verified()
    loaded = store.load(key, tiny)
    assert loaded.digests == "hashed" and hashes
    with Artifact(path) as art:
        assert store.verified_identity(key) == art.identity  # re-recorded after a full hash
    hashes.clear()
    forget_verified()
    assert store.load(key, tiny).digests == "recorded" and hashes == []
    _flip(path, path.stat().st_size - 20000)  # a write changes the identity, so this is hashed and refused
    forget_verified()
    agent = Agent(tiny, store, cache=False)
    r = agent.caches_for(DOC + " and more")
    assert r.reused == 0 and r.quarantined and r.quarantined[0]["key"] == key


def test_the_record_survives_a_use_that_sets_the_mtime(tiny, tmp_path, hashes):
    store = Store(tmp_path / "s")
    key = store.publish(tiny, DOC, chunk_size=32).key
    store.touch(key, when=1_000_000.0)  # LRU time written to the file: its ctime changes
    with Artifact(store.path(key)) as art:
        assert store.verified_identity(key) == art.identity
    forget_verified()
    hashes.clear()
    assert store.load(key, tiny).digests == "recorded" and hashes == []


def test_in_a_real_new_process(tiny, tmp_path):
    store = Store(tmp_path / "s")
    key = store.publish(tiny, DOC, chunk_size=32).key
    code = ("import sys; from kvmlx.models import load_model; from kvmlx.runtime.store import Store\n"
            "lm = load_model('builtin:tiny', 'bfloat16'); print(Store(sys.argv[1]).load(sys.argv[2], lm).digests)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), key], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "recorded"


def test_store_verify_scrubs_and_quarantines(tiny, tmp_path, hashes):
    runner = CliRunner()
    root = tmp_path / "s"
    store = Store(root)
    good = store.publish(tiny, DOC, chunk_size=32).key
    bad = store.publish(tiny, DOC + " another one", chunk_size=32).key
    # bit rot that keeps the file's identity (simulated: the record is made to match the damaged file)
    path = store.path(bad)
    _flip(path, path.stat().st_size - 20000)
    with Artifact(path) as art:
        store.index.record_verified(bad, art.identity, 0.0)
    forget_verified()
    assert store.load(bad, tiny).digests == "recorded"  # the documented limit: a matching identity is trusted
    result = runner.invoke(main, ["store", "--dir", str(root), "verify"])
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert any(line.startswith("ok ") and good[:16] in line for line in lines)
    bad_line = next(line for line in lines if line.startswith("BAD"))
    assert bad[:16] in bad_line and "quarantined" in bad_line and "verify failed" in bad_line
    assert "1 ok, 1 bad" in result.stderr
    assert store.get(bad) is None and store.get(good) is not None
    assert len(list((root / "quarantine").glob("*.reason.txt"))) == 1
    again = runner.invoke(main, ["store", "--dir", str(root), "verify", "--json"])
    assert again.exit_code == 0 and [r["ok"] for r in json.loads(again.stdout)] == [True]


@pytest.mark.parametrize("old", ["5", "6 without verified", "6 without restore"])
def test_schema_change_rebuilds_an_old_index(tiny, tmp_path, old):
    """An index of an earlier schema (5; either branch's 6: no `verified` table, or no `restore`
    column for state checkpoints) is rebuilt, not misread."""
    import sqlite3

    root = tmp_path / "s"
    key = Store(root).publish(tiny, DOC, chunk_size=32).key
    with sqlite3.connect(root / "index.sqlite") as c:
        if old != "6 without restore":
            c.execute("DROP TABLE verified")
        if old != "6 without verified":
            c.execute("ALTER TABLE artifacts DROP COLUMN restore")
        c.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (old[0],))
    store = Store(root)
    assert store.get(key) is not None and store.verified_identity(key) is None
    forget_verified()
    assert store.load(key, tiny).digests == "hashed"
    assert store.verified_identity(key) is not None  # recorded by that full hash


def test_recorded_identity_is_checked_field_by_field(tiny, tmp_path):
    path = tmp_path / "a.kvmlx"
    publish(tiny, DOC, path, chunk_size=32)
    with Artifact(path) as art:
        ident = art.identity
    from dataclasses import replace

    forget_verified()
    for change in ({"inode": ident.inode + 1}, {"size": ident.size + 1}, {"mtime_ns": ident.mtime_ns + 1},
                   {"ctime_ns": ident.ctime_ns + 1}, {"header_digest": "0" * 64}, {"device": ident.device + 1}):
        with Artifact(path, verified=replace(ident, **change)) as art:
            assert not art.verified_before, change
    with Artifact(path, verified=ident) as art:
        assert art.verified_before and art.recorded
    assert fmt.VerifiedIdentity is type(ident)


def test_version_2_loads_record_only_what_they_hashed(preset, tmp_path, hashes, monkeypatch):
    """A sliding-window artifact with state checkpoints: a load of one checkpoint (what an agent does)
    hashes only the tensors it reads, so it is "partial" and records nothing; a whole load is
    "hashed" and recorded, after which a new process's loads (agent or whole) hash nothing."""
    monkeypatch.setattr("kvmlx.artifact.verified.SETTLED_SECONDS", 3600.0)  # nothing remembered in-process
    lm = preset("sliding")
    tokens = lm.tokenizer.encode(DOC * 2)[:96]
    store = Store(tmp_path / "s")
    key = store.publish(lm, tokens, chunk_size=16, checkpoint_every=32).key
    path = store.path(key)
    with Artifact(path) as art:
        assert art.header["version"] == 3 and art.header["caches"] and art.header["checkpoints"]
        assert store.verified_identity(key) == art.identity  # publish hashed what it wrote
        n_tensors = len(art.tensors)
    store.index.run(lambda c: c.execute("DELETE FROM verified"))
    forget_verified()
    hashes.clear()
    r = Agent(lm, store, cache=False).caches_for(tokens[:70] + [7, 8, 9])
    assert r.reused == 64 and r.entry.key == key  # the checkpoint at 64
    assert 0 < len(hashes) < n_tensors  # only the final states, logits and that checkpoint
    assert store.verified_identity(key) is None  # a partial hash is no verification
    loaded = store.load(key, lm, at=64)
    assert loaded.digests == "partial" and store.verified_identity(key) is None
    hashes.clear()
    loaded = store.load(key, lm)
    assert loaded.digests == "hashed" and len(hashes) == n_tensors
    with Artifact(path) as art:
        assert store.verified_identity(key) == art.identity
    forget_verified()
    hashes.clear()
    assert store.load(key, lm, at=32).digests == "recorded" and hashes == []
    r = Agent(lm, store, cache=False).caches_for(tokens[:40] + [7, 8, 9])
    assert r.reused == 32 and hashes == []
    _flip(path, path.stat().st_size - 100)  # a write: the record no longer matches, the damage is found
    forget_verified()
    r = Agent(lm, store, cache=False).caches_for(tokens[:40] + [7, 8, 9])
    assert r.reused == 0 and r.quarantined and r.quarantined[0]["key"] == key


def test_the_serving_engine_records_what_it_hashed(preset, tmp_path, hashes):
    """The engine loads a version-2 entry with every checkpoint (a resident copy): every digest is
    hashed, so the identity is recorded, and a new process's engine hashes nothing."""
    from kvmlx.serving.engine import Engine

    lm = preset("sliding")
    tokens = lm.tokenizer.encode(DOC * 2)[:96]
    store = Store(tmp_path / "s")
    key = store.publish(lm, tokens, chunk_size=16, checkpoint_every=32).key
    store.index.run(lambda c: c.execute("DELETE FROM verified"))
    forget_verified()
    assert Engine(lm, store, cache=False).prepare(tokens[:70] + [7, 8, 9])[2] == 64
    with Artifact(store.path(key)) as art:
        assert store.verified_identity(key) == art.identity
    forget_verified()
    hashes.clear()
    assert Engine(lm, store, cache=False).prepare(tokens[:40] + [7, 8, 9])[2] == 32 and hashes == []


def test_a_checkpoint_loaded_again_in_one_process_is_not_hashed_again(preset, tmp_path, hashes, monkeypatch):
    """The tensors a partial load hashed are remembered (per file identity, by tensor): loading the
    same checkpoint again hashes nothing ("remembered"), another checkpoint is hashed once too, and a
    file written since is hashed again. A store still records only whole verifications."""
    monkeypatch.setattr("kvmlx.artifact.verified.SETTLED_SECONDS", -1.0)
    forget_verified()
    lm = preset("sliding")
    tokens = lm.tokenizer.encode(DOC * 2)[:96]
    path = tmp_path / "s.kvmlx"
    publish(lm, tokens, path, chunk_size=16, checkpoint_every=32)
    from kvmlx.runtime.load import load_artifact

    first = load_artifact(path, lm, at=64)
    assert first.digests == "partial" and hashes
    hashes.clear()
    again = load_artifact(path, lm, at=64)
    assert again.digests == "remembered" and hashes == []
    assert [c.state[0].tolist() for c in again.caches if c.state[0] is not None] == \
        [c.state[0].tolist() for c in first.caches if c.state[0] is not None]
    other = load_artifact(path, lm, at=32)  # tensors not all hashed before: the load hashes what it reads
    assert other.digests == "partial" and hashes
    hashes.clear()
    assert [load_artifact(path, lm, at=k).digests for k in (32, 64)] == ["remembered"] * 2 and hashes == []
    _flip(path, path.stat().st_size - 1)  # the padding at the end: any write makes it another file
    hashes.clear()
    from kvmlx.errors import IntegrityError

    with pytest.raises(IntegrityError, match="padding"):
        load_artifact(path, lm, at=64)
    forget_verified()
