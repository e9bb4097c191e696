"""Automatic reuse from the store: longest prefix, trimming, chat prefixes; token-exact against prefill."""

import json
from importlib import resources

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner

from kvmlx.runtime.agent import Agent, chat_messages, chat_prefix_tokens, chat_prompt_tokens
from kvmlx.cli import main
from kvmlx.artifact.format import read_header
from kvmlx.runtime.store import Store

CHUNK = 16
MAX = 24
CPU = mx.default_device() == mx.cpu


def assert_exact(v, reused, prefilled):
    """Reuse equals prefilling from scratch: same greedy tokens, bit-identical logits (CPU backend)."""
    assert (v.reuse.reused_tokens, v.reuse.prefilled_tokens) == (reused, prefilled)
    assert v.tokens_compared == MAX and v.token_exact, (v.reuse.tokens, v.scratch.tokens)
    assert v.plain["token_exact"] and v.plain["tokens_compared"] == MAX
    if CPU:
        assert v.max_abs_logit_diff == 0.0 and v.plain["max_abs_logit_diff"] == 0.0
    assert len(set(v.reuse.tokens)) >= 6  # the comparison is not vacuous: greedy output varies


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_full_partial_and_no_match_are_token_exact(tmp_path, models, document, dtype):
    lm = models(dtype)
    toks = list(lm.tokenizer.encode(document))
    agent = Agent(lm, Store(tmp_path / "s"), cache=False)
    key = agent.publish(toks[:100], chunk_size=CHUNK).key
    question = toks[300:320]

    v = agent.verify(toks[:100], max_tokens=MAX)  # the prompt is the document: stored logits, no model call
    assert_exact(v, 100, 0)
    assert v.reuse.key == key and v.reuse.artifact.endswith(f"{key}.kvmlx")
    assert_exact(agent.verify(toks[:100] + question, max_tokens=MAX), 100, 20)  # full reuse + suffix
    assert_exact(agent.verify(toks[:70] + question, max_tokens=MAX), 70, 20)  # partial: trimmed to 70
    assert_exact(agent.verify(toks[:64], max_tokens=MAX), 63, 1)  # inside the document: the last token is run
    assert_exact(agent.verify(toks[:37] + toks[:5], max_tokens=MAX), 37, 5)
    v = agent.verify(toks[300:340], max_tokens=MAX)  # no match: plain prefill of the whole prompt
    assert_exact(v, 0, 40)
    assert v.reuse.key is None and v.reuse.artifact is None


def test_caches_for_feed_mlx_lm(tmp_path, tiny, toks):
    agent = Agent(tiny, tmp_path / "s", cache=False)
    agent.publish(toks[:100], chunk_size=CHUNK)
    prompt = toks[:80] + toks[300:310]
    caches, suffix, reused = agent.caches_for(prompt)
    assert reused == 80 and suffix == prompt[80:] and all(c.offset == 80 for c in caches)
    streamed = [r.token for r in mlx_lm.stream_generate(tiny.model, tiny.tokenizer, prompt=suffix, prompt_cache=caches,
                                                        max_tokens=12)]
    ours = agent.generate(prompt, max_tokens=12).tokens
    assert streamed == ours and len(set(ours)) >= 4
    assert list(agent.stream(prompt, max_tokens=12)) == ours
    assert agent.last_reuse.reused == 80
    # the whole document as the prompt: for mlx-lm the suffix keeps one token
    caches, suffix, reused = agent.caches_for(toks[:100])
    assert (reused, suffix) == (99, toks[99:100])


def test_uses_are_recorded_for_gc(tmp_path, tiny, toks):
    store = Store(tmp_path / "s")
    agent = Agent(tiny, store, cache=False)
    a = agent.publish(toks[:40], chunk_size=CHUNK).key
    b = agent.publish(toks[300:360], chunk_size=CHUNK).key
    store.touch(a, when=1.0)
    store.touch(b, when=2.0)
    assert agent.generate(toks[:40] + toks[:3], max_tokens=2).key == a  # a is now the most recently used
    assert store.get(a).last_used > store.get(b).last_used
    assert store.gc(store.get(a).file_bytes).evicted == [b]


def test_new_user_two_documents(tmp_path, tiny, document):
    """Done when: publish two documents into the store, ask questions starting with either, and kvmlx
    reuses the right one for the whole document, token-exactly, with no file named."""
    other = resources.files("kvmlx").joinpath("data/corpus.txt").read_text(encoding="utf-8")[:1500]
    docs = [document.strip(), other[: other.rindex(".") + 1]]
    agent = Agent(tiny, Store(tmp_path / "store"), cache=False)
    published = [agent.publish(d) for d in docs]
    assert published[0].key != published[1].key
    for doc, pub in zip(docs, published):
        n_doc = len(tiny.tokenizer.encode(doc))
        assert pub.entry.num_tokens == n_doc
        for question in ("\n\nQuestion: what is this document about?\nAnswer:", "\n\nQ: and why does it matter?\nA:"):
            prompt = doc + question
            out = agent.generate(prompt, max_tokens=8)
            assert out.key == pub.key and out.reused_tokens == n_doc
            assert out.prefilled_tokens == len(tiny.tokenizer.encode(prompt)) - n_doc > 0
            assert_exact(agent.verify(prompt, max_tokens=MAX), n_doc, out.prefilled_tokens)


def test_chat_prefix_is_reused_fully(tmp_path, tiny, document):
    system = "You answer questions about the document."
    agent = Agent(tiny, Store(tmp_path / "s"), cache=False)
    prefix = chat_prefix_tokens(tiny, document, system)
    text = tiny.tokenizer.decode(prefix)
    assert text.startswith("<|im_start|>system\n" + system + "<|im_end|>\n<|im_start|>user\n")
    assert document.strip() in text and "<|im_start|>assistant" not in text
    pub = agent.publish(document, chat=True, system=system)
    assert agent.store.tokens(pub.key) == prefix
    for question in ("What is published?", " why reuse it?", "1) list the costs", "\nSummarize.", "中文?"):
        prompt = chat_prompt_tokens(tiny, document, question, system)
        assert prompt[: len(prefix)] == prefix
        rendered = tiny.tokenizer.apply_chat_template(chat_messages(document, question, system), tokenize=False,
                                                      add_generation_prompt=True)
        assert agent.encode(rendered) == prompt  # the same conversation as plain text reuses the same way
        v = agent.verify(prompt, max_tokens=MAX)
        assert_exact(v, len(prefix), len(prompt) - len(prefix))
        assert v.reuse.key == pub.key
    # a conversation without that system prompt shares only `<|im_start|>`: not worth a load
    plain = chat_prompt_tokens(tiny, document, "What?")
    assert agent.generate(plain, max_tokens=2).reused_tokens == 0
    no_system = agent.publish(document, chat=True)
    out = agent.ask(document, "What?", max_tokens=2)
    assert out.key == no_system.key and out.reused_tokens == len(chat_prefix_tokens(tiny, document))


def test_missing_or_corrupt_entries_fall_back(tmp_path, tiny, toks):
    store = Store(tmp_path / "s")
    agent = Agent(tiny, store, cache=False)
    long_key = agent.publish(toks[:100], chunk_size=CHUNK).key
    short_key = agent.publish(toks[:50], chunk_size=CHUNK).key
    prompt = toks[:100] + toks[300:310]
    path = store.path(long_key)
    t = next(t for t in read_header(path)["tensors"] if t["name"] == "layers.1.keys")
    data = bytearray(path.read_bytes())
    data[t["offset"] + 7] ^= 0x40
    path.write_bytes(bytes(data))  # corrupted on disk after it was stored
    assert_exact(agent.verify(prompt, max_tokens=MAX), 50, 60)  # digest check fails: next best match
    assert store.get(long_key) is None and any((tmp_path / "s" / "quarantine").iterdir())
    store.path(short_key).unlink()  # removed behind the store's back (e.g. by another process's gc)
    assert_exact(agent.verify(prompt, max_tokens=MAX), 0, len(prompt))
    assert store.ls() == []
    assert store.gc().quarantine_removed >= 1


def test_verify_catches_wrong_kv(tmp_path, tiny, toks):
    """The agent's comparison is not vacuous: KV altered on disk and loaded unchecked is reported."""
    store = Store(tmp_path / "s")
    key = store.publish(tiny, toks[:100], chunk_size=CHUNK).key
    path = store.path(key)
    h = read_header(path)
    data = bytearray(path.read_bytes())
    for t in h["tensors"]:
        if t["name"].endswith(".keys"):
            data[t["offset"] : t["offset"] + t["nbytes"]] = bytes(t["nbytes"])  # zero every key
    path.write_bytes(bytes(data))
    v = Agent(tiny, store, verify_digests=False, cache=False).verify(toks[:100] + toks[300:310], max_tokens=MAX)
    assert v.reuse.reused_tokens == 100 and not v.logits_identical and v.max_abs_logit_diff > 0.01


def test_another_models_entry_is_never_used(tmp_path, models, document):
    f32, bf16 = models("float32"), models("bfloat16")
    store = Store(tmp_path / "s")
    tokens = list(f32.tokenizer.encode(document))
    key = Agent(f32, store, cache=False).publish(tokens[:100], chunk_size=CHUNK).key
    assert Agent(bf16, store, cache=False).generate(tokens[:110], max_tokens=2).reused_tokens == 0
    out = Agent(f32, store, cache=False).generate(tokens[:110], max_tokens=2)
    assert (out.key, out.reused_tokens) == (key, 100)


def test_lossy_entries_only_when_allowed(tmp_path, tiny, toks):
    store = Store(tmp_path / "s")
    agent = Agent(tiny, store, cache=False)
    lossy = agent.publish(toks[:100], chunk_size=CHUNK, encoding="q8")
    assert not lossy.entry.lossless and lossy.entry.encoding == "q8"
    prompt = toks[:100] + toks[300:310]
    assert agent.generate(prompt, max_tokens=2).reused_tokens == 0  # exact by default: quantised KV is not used
    loose = Agent(tiny, store, allow_lossy=True, cache=False)
    assert loose.generate(prompt, max_tokens=2).key == lossy.key
    exact = agent.publish(toks[:100], chunk_size=CHUNK)
    assert exact.key != lossy.key and not exact.existed
    assert loose.generate(prompt, max_tokens=2).key == exact.key  # exact KV preferred at equal length


# ---- CLI (kvmlx/cli/ integration) -------------------------------------------------------------


def run(args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], **kw)
    assert result.exit_code == 0, result.output
    return result


def test_cli_publish_store_and_generate_without_artifact(tmp_path, tiny, document):
    store, doc = tmp_path / "store", tmp_path / "doc.txt"
    text = document.strip()
    doc.write_text(text, encoding="utf-8")
    pub = json.loads(run(["publish", doc, "--store-dir", store, "--chunk-size", 32, "--json"]).output)
    n_doc = len(tiny.tokenizer.encode(text))
    assert pub["tokens"] == n_doc and not pub["existed"] and len(pub["key"]) == 64
    assert json.loads(run(["publish", doc, "--store-dir", store, "--json"]).output)["existed"]  # same tokens
    prompt = text + "\n\nQuestion: why?\nAnswer:"
    out = json.loads(run(["generate", "--store", store, "--no-cache", "--prompt", prompt, "-n", 6, "--json"]).output)
    assert out["reused_tokens"] == n_doc and out["key"] == pub["key"] and out["artifact"].endswith(".kvmlx")
    assert out["prefilled_tokens"] == len(tiny.tokenizer.encode(prompt)) - n_doc and len(out["tokens"]) == 6
    pfile = tmp_path / "prompt.txt"
    pfile.write_text(prompt, encoding="utf-8")
    ver = json.loads(run(["generate", "--store", store, "--no-cache", "--prompt-file", pfile, "--verify", "--json"]).output)
    assert ver["token_exact"] and ver["reused_tokens"] == n_doc
    assert ver["max_abs_logit_diff"] == 0.0 or not CPU
    miss = json.loads(run(["generate", "--store", store, "--no-cache", "--prompt", "Nothing like it", "-n", 2, "--json"]).output)
    assert miss["reused_tokens"] == 0 and miss["key"] is None and miss["artifact"] is None
    words = run(["generate", "--store", store, "--no-cache", "--prompt", prompt, "-n", 2])
    assert f"reused {n_doc} of" in words.output

    system = "Be brief."
    chat = json.loads(run(["publish", doc, "--store-dir", store, "--chat", "--system", system, "--json"]).output)
    assert chat["tokens"] == len(chat_prefix_tokens(tiny, text, system))
    ask = json.loads(run(["generate", "--store", store, "--no-cache", "--chat-document", doc, "--system", system,
                          "--prompt", "What is it?", "-n", 3, "--json"]).output)
    assert ask["reused_tokens"] == chat["tokens"] and ask["key"] == chat["key"]

    bad = CliRunner().invoke(main, ["publish", str(doc)])
    assert bad.exit_code == 2 and "--store" in bad.output
