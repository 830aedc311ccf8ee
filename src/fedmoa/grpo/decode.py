"""How ``generate`` runs a model's decode steps: eager (one ATen call per op) or compiled.

``compiled`` decodes into a static KV cache with each step's forward compiled by
``torch.compile`` (inductor, CPU or CUDA), through transformers' own auto-compile of
static-cache generation. The LoRA adapter stays live in the graph (no merge: a bf16 merge
rounds small deltas away, and the weights change every optimiser step, which the compiled
step reads like any other input). Prefill stays eager.

Shapes: a decode step's graph depends on the batch and on the static cache's length.
Prompts are left-padded to a multiple of :data:`PROMPT_BUCKET` tokens and transformers never
shrinks the cache between calls, so a run compiles a graph per batch size and per prompt
bucket reached, a handful. Inductor's on-disk cache lives in fedmoa's cache folder
(``$TORCHINDUCTOR_CACHE_DIR`` wins when set), so later processes load graphs instead of
compiling them.

``auto`` picks what measured faster (docs/performance.md, "Compiled decode"): on this
project's 2-core CPU the compiled step is 1.1-1.2x faster at batch 1 and no faster at batch
32, for 30-45 s of compile per graph, so ``auto`` is eager on CPU; on CUDA it is compiled
(transformers' own default for static caches there, with CUDA graphs).

If compiling fails at run time, the call is redone eagerly from the same random state and the
model decodes eagerly from then on; the reason is logged once.
"""

from __future__ import annotations

import copy
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessorList

logger = logging.getLogger(__name__)

DecodeMode = Literal["auto", "compiled", "eager"]
DECODE_MODES: tuple[str, ...] = ("auto", "compiled", "eager")
PROMPT_BUCKET = 64


@dataclass
class DecodePlan:
    mode: Literal["compiled", "eager"]
    failure: str | None = None  # why compiling failed, once it has


_PLANS: weakref.WeakKeyDictionary[torch.nn.Module, DecodePlan] = weakref.WeakKeyDictionary()


def _owner(model: Any) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper: the plan outlives attaching an adapter."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolve_decode(mode: str, device: torch.device) -> Literal["compiled", "eager"]:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode {mode!r}: expected one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return "compiled" if mode == "compiled" else "eager"


def set_decode(model: Any, mode: str, cache_dir: str | Path | None = None) -> str:
    """Choose how ``model`` decodes from now on; returns the resolved mode."""
    owner = _owner(model)
    resolved = resolve_decode(mode, next(owner.parameters()).device)
    _PLANS[owner] = DecodePlan(resolved)
    if resolved == "compiled" and cache_dir is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))
    return resolved


def decode_mode(model: Any) -> str:
    """How ``model`` decodes now: ``eager`` unless :func:`set_decode` chose otherwise and
    compiling has not failed."""
    plan = _PLANS.get(_owner(model))
    return "eager" if plan is None or plan.failure is not None else plan.mode


def bucket_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, bucket: int = PROMPT_BUCKET
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a batch of prompts to a multiple of ``bucket`` tokens (masked out)."""
    extra = -input_ids.shape[1] % bucket
    if extra == 0:
        return input_ids, attention_mask
    rows = input_ids.shape[0]
    pad = input_ids.new_full((rows, extra), pad_id)
    return (
        torch.cat([pad, input_ids], dim=1),
        torch.cat([attention_mask.new_zeros((rows, extra)), attention_mask], dim=1),
    )


def _compile_config(device: torch.device) -> CompileConfig:
    # CUDA graphs on CUDA (transformers' default); on CPU "reduce-overhead" has nothing to add.
    config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    if device.type != "cuda":
        config.mode = "default"
        config._compile_all_devices = True  # transformers compiles on CUDA-like devices only
    return config


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    logits_processor: LogitsProcessorList | None = None,
    prompt_cache: Any | None = None,
) -> torch.Tensor:
    """``model.generate`` under the model's decode plan; returns only the new tokens [N, T].

    ``prompt_cache``: a KV cache of the prompts' first tokens for the eager decode
    (``logprobs.prompt_prefix_cache``), so that the prefill runs only the rest; the compiled
    decode fills its static cache itself. Processors with a ``reset()`` method are reset
    before an eager retry.
    """
    mode = decode_mode(model)
    width = input_ids.shape[1]
    if mode == "eager":
        return _generate(model, input_ids, attention_mask, config, logits_processor, prompt_cache)[
            :, width:
        ]
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    ids, mask = bucket_prompts(input_ids, attention_mask, pad_id)
    compiled_config = copy.deepcopy(config)
    compiled_config.cache_implementation = "static"
    compiled_config.compile_config = _compile_config(ids.device)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        output = _generate(model, ids, mask, compiled_config, logits_processor)
    except Exception as err:  # inductor has many ways to fail: no compiler, an unsupported op
        reason = _root_cause(err)
        _PLANS[_owner(model)].failure = reason
        logger.warning("compiled decode failed, decoding eagerly from now on (%s)", reason)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for processor in logits_processor or []:
            if hasattr(processor, "reset"):
                processor.reset()
        return _generate(model, input_ids, attention_mask, config, logits_processor)[:, width:]
    return output[:, ids.shape[1] :]


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost cause: dynamo wraps a backend's error in its own."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    logits_processor: LogitsProcessorList | None,
    prompt_cache: Any | None = None,
) -> torch.Tensor:
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=logits_processor
        if logits_processor is not None
        else LogitsProcessorList(),
        **({"cache": prompt_cache} if prompt_cache is not None else {}),
    )
