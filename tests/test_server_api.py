"""The OpenAI layer's answers to hostile and unusual input, in process (Starlette's TestClient, which
re-raises any server exception): every case is a 4xx naming the field, never a 5xx; plus the model
name and its aliases, 429 with Retry-After, the prompt-length limit, and logprobs in OpenAI's shapes.
"""

import json

import pytest
from starlette.testclient import TestClient

from kvmlx.serving.engine import Engine, Job
from kvmlx.serving.openai import Server
from kvmlx.serving.sampling import Params

MODEL = "builtin:tiny"


@pytest.fixture(scope="module")
def idle(tiny):
    """A server whose engine never runs: validation answers before anything is queued."""
    server = Server(Engine(tiny, None, max_queued=2), aliases=["tiny-alias"], max_body_bytes=64 << 10,
                    max_prompt_tokens=300)
    with TestClient(server.app) as client:
        yield client, server


@pytest.fixture(scope="module")
def live(tiny):
    engine = Engine(tiny, None).start()
    server = Server(engine, aliases=["tiny-alias"])
    with TestClient(server.app) as client:
        yield client
    engine.stop()


def post(client, body, path="/v1/completions", raw=None):
    data = raw if raw is not None else json.dumps(body, allow_nan=True)
    return client.post(path, content=data, headers={"content-type": "application/json"})


def assert_400(r, param):
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"], err


BASE = {"model": MODEL, "prompt": "hello", "max_tokens": 2}


@pytest.mark.parametrize("raw", ["[1, 2]", "null", '"a string"', "42", "true", "{", "\xff".encode("latin-1")])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_object_or_invalid_body(idle, raw, path):
    assert_400(post(idle[0], None, path, raw=raw), None)


def test_deep_nesting(idle):
    deep = '{"prompt": "x", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert_400(post(idle[0], None, raw=deep), None)
    assert_400(post(idle[0], None, raw=json.dumps({"prompt": "x", "a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})), None)


def test_body_too_large(idle):
    r = post(idle[0], None, raw=json.dumps(dict(BASE, prompt="x" * (70 << 10))))
    assert_400(r, None)
    assert r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("top_p", float("-inf")), ("repetition_penalty", float("nan")),
                                         ("presence_penalty", float("inf")), ("min_p", float("nan"))])
def test_non_finite_numbers(idle, field, value):
    assert_400(post(idle[0], dict(BASE, **{field: value})), field)
    assert_400(post(idle[0], {"messages": [{"role": "user", "content": "hi"}], field: value},
                    "/v1/chat/completions"), field)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**200, 1.5, "7", True])
def test_bad_seed(idle, seed):
    assert_400(post(idle[0], dict(BASE, seed=seed)), "seed")


def test_huge_integer_fields(idle):
    raw = json.dumps(BASE)[:-1] + ', "seed": ' + "9" * 4300 + "}"
    r = post(idle[0], None, raw=raw)  # Python refuses to parse a 4,300-digit int: still a 400
    assert r.status_code == 400


@pytest.mark.parametrize("body,path,param", [
    (dict(BASE, prompt="ab\ud800cd"), "/v1/completions", "prompt"),
    ({"messages": [{"role": "user", "content": "x\udfffy"}]}, "/v1/chat/completions", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}, "/v1/chat/completions",
     "messages"),
    (dict(BASE, stop=["ok", "\ud800"]), "/v1/completions", "stop"),
])
def test_lone_surrogates(idle, body, path, param):
    assert_400(post(idle[0], body, path), param)


@pytest.mark.parametrize("stop", [5, {"a": 1}, [1, 2], ["a", "b", "c", "d", "e"], True, ["a", None]])
def test_wrong_stop_types(idle, stop):
    assert_400(post(idle[0], dict(BASE, stop=stop)), "stop")


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 10**9), ("top_p", 1.5),
    ("top_k", -1), ("min_p", 2), ("n", 2), ("stream", "yes"), ("logprobs", "yes"), ("top_logprobs", 50),
    ("logit_bias", {"99999": 1}), ("logit_bias", {"x": 1}), ("logit_bias", [1]), ("repetition_context_size", -2),
    ("stream_options", "x"), ("ignore_eos", 1), ("prompt", [1, True]), ("prompt", [-1]), ("prompt", 5),
    ("prompt", []), ("prompt", ""), ("model", 5),
])
def test_wrong_types_and_ranges(idle, field, value):
    assert_400(post(idle[0], dict(BASE, **{field: value})), field)


def test_chat_messages_checked(idle):
    for messages in [None, [], ["x"], [{"content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url"}]}]]:
        assert_400(post(idle[0], {"messages": messages}, "/v1/chat/completions"), "messages")


def test_unknown_model_is_404(idle):
    r = post(idle[0], dict(BASE, model="gpt-4o"))
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4o" in err["message"]
    r = post(idle[0], {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert r.status_code == 404
    ids = [m["id"] for m in idle[0].get("/v1/models").json()["data"]]
    assert ids == [MODEL, "tiny-alias"]


def test_prompt_too_long(idle):
    r = post(idle[0], dict(BASE, prompt=list(range(5, 306))))
    assert_400(r, "prompt")
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_queue_full_is_429(idle):
    client, server = idle
    engine = server.engine
    for _ in range(engine.max_queued - engine._queued):
        engine.submit(Job([1, 2], Params(), lambda *a: None))  # the idle engine never takes them
    r = post(client, BASE)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    # refused (and every 4xx before it): no request is left counted as still arriving
    assert engine._arriving == 0


def test_alias_and_logprobs(live):
    r = post(live, dict(BASE, model="tiny-alias", logprobs=3, max_tokens=3, ignore_eos=True))
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(t) <= 3 and max(t.values()) <= 0 for t in lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"]) and lp["text_offset"][0] == 0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True}
    c = post(live, body, "/v1/chat/completions").json()["choices"][0]["logprobs"]["content"]
    assert len(c) == 3 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in c)
    assert c[0]["top_logprobs"][0]["logprob"] >= c[0]["logprob"] - 1e-6  # greedy: the chosen one is the best
    # streamed: the same tokens' logprobs arrive across the chunks
    events = [json.loads(line[6:]) for line in live.post("/v1/chat/completions", json=dict(body, stream=True)).text.splitlines()
              if line.startswith("data: {")]
    streamed = [e for ev in events for ch in ev["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert [e["id"] for e in streamed] == [e["id"] for e in c]
