"""The artifact server under hostile ranges and several worker processes: Range numbers of any length
get 416 or the whole file (never a 500), and a token's loads stay exact across `--workers 4` because
they are spent through the SQLite ledger's conditional update (10 racing downloads of a 2-load token:
exactly 2 full copies, and the report agrees).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fuzz_corpus import synthetic_artifact
from test_distribute import _digest, _server

from kvmlx.artifact import trust as trust_api
from kvmlx.serving.artifacts import PRICES_FILE, _parse_range, ledger_path
from kvmlx.serving.entitlements import issue_token, read_log, report, token_claims_unverified
from kvmlx.serving.ledger import Ledger, Spent

PRICE = 0.5
HUGE = "9" * 4301  # more digits than Python's int() converts


def test_parse_range_any_length():
    assert _parse_range(f"bytes={HUGE}-", 100) == "bad"
    assert _parse_range(f"bytes={HUGE}-{HUGE}", 100) == "bad"
    assert _parse_range(f"bytes=0-{HUGE}", 100) is None  # ignored: the whole file
    assert _parse_range(f"bytes=-{HUGE}", 100) is None
    assert _parse_range("bytes=" + "0" * 5000 + "5-" + "0" * 5000 + "9", 100) == (5, 9)  # leading zeros are fine
    assert _parse_range("bytes=10-", 100) == (10, 99) and _parse_range("bytes=-10", 100) == (90, 99)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    served = root / "served"
    served.mkdir()
    key = trust_api.generate_key()
    (root / "pub").write_text(trust_api.public_key_id(key))
    free = synthetic_artifact(served / "free.kvmlx", tokens=40, head_dim=64, seed=1)
    paid = synthetic_artifact(served / "paid.kvmlx", tokens=64, head_dim=64, seed=2)
    digests = {"free": _digest(free), "paid": _digest(paid)}
    (served / PRICES_FILE).write_text(f'{{"{digests["paid"]}": {PRICE}}}')
    log = root / "metering.jsonl"
    with _server(served, "--publisher-key", str(root / "pub"), "--log", str(log), "--workers", "4") as url:
        yield dict(url=url, key=key, digests=digests, paths={"free": free, "paid": paid}, log=log)


def test_huge_range_numbers(site):
    url = f"{site['url']}/artifacts/{site['digests']['free']}"
    data = site["paths"]["free"].read_bytes()
    r = httpx.get(url, headers={"Range": f"bytes={HUGE}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    for rng in (f"bytes=0-{HUGE}", f"bytes=-{HUGE}", f"bytes={HUGE}"):
        r = httpx.get(url, headers={"Range": rng})
        assert r.status_code == 200 and r.content == data, rng
    # a priced artifact: the range is harmless before the token check, which still answers
    paid = f"{site['url']}/artifacts/{site['digests']['paid']}"
    assert httpx.get(paid, headers={"Range": f"bytes={HUGE}-{HUGE}"}).status_code in (401, 416)
    assert httpx.get(paid, headers={"Range": f"bytes=0-{HUGE}"}).status_code == 401


def test_two_load_token_raced_across_workers(site):
    """10 downloads at once with a 2-load token, spread over 4 worker processes: exactly 2 full copies."""
    url = f"{site['url']}/artifacts/{site['digests']['paid']}"
    data = site["paths"]["paid"].read_bytes()
    token = issue_token(site["key"], site["digests"]["paid"], 2, time.time() + 3600)
    tid = token_claims_unverified(token)["tid"]
    results = _race(url, {"Authorization": f"Bearer {token}"})
    ok = [body for status, body in results if status == 200]
    assert len(results) == 10 and len(ok) == 2 and all(body == data for body in ok)
    assert sorted(status for status, _ in results) == [200] * 2 + [403] * 8
    deadline = time.monotonic() + 10
    while sum(1 for r in read_log(site["log"]) if r["token"] == tid) < 2:  # logged when each response ends
        assert time.monotonic() < deadline
        time.sleep(0.05)
    row = next(r for r in report(site["log"], {site["digests"]["paid"]: PRICE})["artifacts"]
               if r["artifact"] == site["digests"]["paid"])
    assert row["paid_loads"] == 2 and row["revenue_usd"] == pytest.approx(2 * PRICE) and row["bytes"] == 2 * len(data)
    ledger = Ledger(ledger_path(site["log"]))
    assert ledger.get(tid) == (2, 2 * len(data))
    ledger.close()
    # the same burst of free downloads is served by more than one worker process
    before = len(read_log(site["log"]))
    assert all(s == 200 for s, _ in _race(f"{site['url']}/artifacts/{site['digests']['free']}", {}))
    time.sleep(0.5)
    assert len({r["worker"] for r in read_log(site["log"])[before:]}) > 1


def _race(url: str, headers: dict, n: int = 10) -> list[tuple[int, bytes]]:
    barrier, results = threading.Barrier(n), []

    def download():
        with httpx.Client() as c:  # one connection each, so the kernel spreads them over the workers
            barrier.wait()
            r = c.get(url, headers=headers, timeout=60)
            results.append((r.status_code, r.content))

    threads = [threading.Thread(target=download) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_ledger_is_seeded_from_an_existing_log(tmp_path):
    """A server upgraded with an old log keeps its counts: the ledger starts from the log, once."""
    log = tmp_path / "metering.jsonl"
    log.write_text('{"token": "t1", "load": true, "bytes": 100}\n{"token": "t1", "load": false, "bytes": 50}\n'
                   '{"token": "t2", "load": true, "bytes": 7}\n{"torn": ')
    ledger = Ledger(ledger_path(log), seed_log=log)
    assert ledger.get("t1") == (1, 150) and ledger.get("t2") == (1, 7)
    with pytest.raises(Spent):
        ledger.take_load("t2", 1)
    assert ledger.take_load("t1", 2) == 2
    ledger.reserve("t1", 100, 100, 100)  # 250 <= 2 x 100 + 100
    with pytest.raises(Spent):
        ledger.reserve("t1", 100, 100, 100)
    ledger.close()
    again = Ledger(ledger_path(log), seed_log=log)  # not seeded twice
    assert again.get("t1") == (2, 250)
    again.close()
