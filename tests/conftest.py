"""Shared fixtures: an isolated KVMLX_HOME and the built-in tiny model, built once per session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def kvmlx_home(tmp_path_factory):
    """Keep built models and artifacts out of the user's cache directory."""
    home = tmp_path_factory.mktemp("kvmlx-home")
    old = os.environ.get("KVMLX_HOME")
    os.environ["KVMLX_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("KVMLX_HOME", None)
    else:
        os.environ["KVMLX_HOME"] = old


@pytest.fixture(scope="session")
def models(kvmlx_home):
    """`models(dtype)` -> the tiny built-in model in that dtype, loaded once per session."""
    from kvmlx.models import load_model

    loaded = {}

    def get(dtype: str = "bfloat16"):
        if dtype not in loaded:
            loaded[dtype] = load_model("builtin:tiny", dtype=dtype)
        return loaded[dtype]

    return get


@pytest.fixture(scope="session")
def tiny(models):
    return models("bfloat16")


@pytest.fixture(scope="session")
def document(tiny):
    """The bundled sample document, as text."""
    from importlib import resources

    return resources.files("kvmlx").joinpath("data/sample_document.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def toks(tiny, document):
    """The sample document's token ids under the tiny model's tokenizer."""
    return list(tiny.tokenizer.encode(document))


@pytest.fixture(scope="session")
def preset(kvmlx_home):
    """`preset(name)` -> a built-in model ("hybrid", "sliding", "gpt-oss", ...), loaded once per session."""
    from kvmlx.models import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_model(f"builtin:{name}")
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def settle_instantly():
    """Files count as settled at once (artifact.verified.SETTLED_SECONDS = 0): a bench run remembers
    the artifact it just wrote instead of sleeping two seconds per length before its re-loads. The
    rule itself is tested in test_format.py and test_fingerprints.py."""
    from kvmlx.artifact import verified
    from kvmlx.measure.bench import harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verified, "SETTLED_SECONDS", 0.0)
        mp.setattr(harness, "SETTLED_SECONDS", 0.0)
        yield
