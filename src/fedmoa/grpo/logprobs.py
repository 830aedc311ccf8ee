"""Per-token log-probabilities of completions under a causal LM."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them, so that a training
    forward sees exactly the positions the sampler saw."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits).gather(index)`` one row at a time, in float32.

    Materialising the full [N, T, V] log-softmax costs N·T·V floats (hundreds of MB
    for a 49k vocabulary); this keeps one row's worth alive. Each row is one fused
    ``log_softmax`` kernel, forward and backward: on 2 CPU threads a quarter cheaper
    than ``x − logsumexp(x)``'s separate max, subtract, exp, sum and log passes
    (``benchmarks/step_vs_trl.py``), equal to it within 1e-5.
    """
    if logits.shape[0] == 0:
        return torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    return torch.stack(
        [
            torch.log_softmax(row_logits.float(), dim=-1)
            .gather(-1, row_index.unsqueeze(-1))
            .squeeze(-1)
            for row_logits, row_index in zip(logits, index, strict=True)
        ]
    )


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
    group_size: int = 1,
) -> torch.Tensor:
    """Log-probs [N, T] of ``completion_ids`` given left-padded prompts.

    Logits are divided by the sampling temperature, so the result is the log-prob
    of the distribution the completions were sampled from (before top-p), as in TRL.

    ``chunk_tokens > 0``: the LM head and the log-softmax run over that many completion
    positions at a time and are recomputed in the backward (:func:`chunked_head_logps`), so
    no ``[T, V]`` float32 tensor per sequence is kept for the backward, only the final hidden
    states ``[N, T, H]``. Same values within float rounding.

    ``group_size = G > 1``: the rows are prompt-major groups of ``G`` sharing one prompt (a
    GRPO batch), and each distinct prompt runs through the model once
    (:func:`shared_prompt_logps`); same values and gradients within float rounding, fewer
    FLOPs. Rows that are not such groups raise ``ValueError``. With activation checkpointing
    on, a forward that builds a graph falls back to the whole sequences (transformers drops
    the KV cache there), as do models with sliding-window layers (:func:`shared_prompt_applies`).
    """
    if group_size > 1:
        check_groups(prompt_ids, prompt_mask, group_size)
        if completion_ids.shape[1] > 0 and shared_prompt_applies(model):
            try:
                return shared_prompt_logps(
                    model,
                    prompt_ids,
                    prompt_mask,
                    completion_ids,
                    completion_mask,
                    temperature,
                    chunk_tokens,
                    group_size,
                )
            except NoPromptCache as err:
                warn_no_prompt_cache(err)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    width = completion_ids.shape[1]
    position_ids = position_ids_from_mask(attention_mask)
    if chunk_tokens > 0:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state[:, -(width + 1) : -1, :]
        head = base.get_output_embeddings()
        return chunked_head_logps(head, hidden, completion_ids, temperature, chunk_tokens)
    with contiguous_head_input(model):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=width + 1,
            use_cache=False,
        ).logits[:, :-1, :]
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, completion_ids)


def check_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int) -> None:
    """Raise ``ValueError`` unless the rows are consecutive groups of ``group_size`` rows with
    the same prompt ids and mask (a GRPO batch: ``Rollout.prompt_ids``)."""
    rows = prompt_ids.shape[0]
    if rows % group_size:
        raise ValueError(f"{rows} rows are not groups of {group_size}")
    for name, tensor in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask)):
        grouped = tensor.reshape(rows // group_size, group_size, -1)
        if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
            raise ValueError(
                f"the rows' {name} differ within a group of {group_size}: group_size is only "
                "for prompt-major groups sharing one prompt"
            )


def shared_prompt_applies(model: torch.nn.Module) -> bool:
    """Whether :func:`shared_prompt_logps` can run ``model``: not while activation checkpointing
    is on in a forward that builds a graph (transformers then drops the KV cache, as the
    recompute in the backward would append to it again), and only with full attention in every
    layer (a sliding-window cache would differ from the whole-sequence mask)."""
    if (
        model.training
        and torch.is_grad_enabled()
        and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_types = getattr(base.config, "layer_types", None)
    return layer_types is None or all(kind == "full_attention" for kind in layer_types)


def shared_prompt_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
    group_size: int,
) -> torch.Tensor:
    """:func:`completion_logps` with each group's shared prompt run through the model once.

    In a GRPO batch the ``G`` rows of a group share their left-padded prompt, so the
    whole-sequence forward runs every prompt token ``G`` times, forward and backward. Here the
    ``B = N / G`` distinct prompts run once with a KV cache, the cache is repeated ``G`` times
    along the batch (``repeat_interleave``: differentiable, so the ``G`` rows' gradients sum
    into the prompt's activations), and the completions run on it with the whole attention
    mask and the positions continuing the prompt's. The log-prob of completion token 0 comes
    from the prompt pass's last position, tokens ``1 … T-1`` from the completion pass, which
    skips the last completion token (its logits predict nothing). A causal LM's outputs at a
    position depend only on the tokens up to it, so values and gradients are those of the
    whole-sequence forward within float rounding. The caller checks the groups
    (:func:`check_groups`) and that the model allows it (:func:`shared_prompt_applies`).
    """
    rows, width = completion_ids.shape
    prompts = prompt_ids[::group_size]
    prompt_part_mask = prompt_mask[::group_size]
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    attention_mask = attention_mask[:, :-1]  # the last completion token is not an input
    positions = position_ids_from_mask(attention_mask)
    prompt_len = prompt_ids.shape[1]
    prompt_inputs = {
        "input_ids": prompts,
        "attention_mask": prompt_part_mask,
        "position_ids": position_ids_from_mask(prompt_part_mask),
        "use_cache": True,
    }
    completion_inputs = {
        "input_ids": completion_ids[:, :-1],
        "attention_mask": attention_mask,
        "position_ids": positions[:, prompt_len:],
        "use_cache": True,
    }
    if chunk_tokens > 0:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = base.get_decoder()
        out = decoder(**prompt_inputs)
        first = out.last_hidden_state[:, -1:, :].repeat_interleave(group_size, dim=0)
        if width > 1:
            cache = repeated_cache(out, group_size)
            rest = decoder(**completion_inputs, cache=cache).last_hidden_state
            hidden = torch.cat([first, rest], dim=1)
        else:
            hidden = first
        head = base.get_output_embeddings()
        return chunked_head_logps(head, hidden, completion_ids, temperature, chunk_tokens)
    with contiguous_head_input(model):
        out = model(**prompt_inputs, logits_to_keep=1)
        first_logits = out.logits[:, -1, :]
        if temperature != 1.0:
            first_logits = first_logits / temperature
        groups = torch.arange(rows, device=completion_ids.device) // group_size
        first = torch.log_softmax(first_logits.float(), dim=-1)[groups, completion_ids[:, 0]]
        if width == 1:
            return first.unsqueeze(1)
        cache = repeated_cache(out, group_size)
        logits = model(**completion_inputs, cache=cache).logits
    if temperature != 1.0:
        logits = logits / temperature
    rest = selective_log_softmax(logits, completion_ids[:, 1:])
    return torch.cat([first.unsqueeze(1), rest], dim=1)


def prompt_prefix_cache(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int
) -> object:
    """The KV cache of each group's prompt but its last token, repeated for the group's rows.

    Sampling's prefill would otherwise run every prompt ``G`` times (on 2 CPU cores, 1.2 of
    the 1.3 s a 32-row prefill of 35-token prompts takes); ``generate`` given this cache
    runs only the last prompt token of each row, whose logits pick the first completion token.
    Rows must be groups sharing one prompt (:func:`check_groups`).
    """
    check_groups(prompt_ids, prompt_mask, group_size)
    prefix = prompt_ids[::group_size, :-1]
    mask = prompt_mask[::group_size, :-1]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_decoder()(
        input_ids=prefix,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=True,
    )
    return repeated_cache(out, group_size)


class NoPromptCache(RuntimeError):
    """The model's forward returned no KV cache that can be repeated along the batch."""


_WARNED: set[str] = set()


def warn_no_prompt_cache(err: NoPromptCache) -> None:
    """Say once per process that ``grpo.prompt_once`` fell back to whole sequences, and why."""
    if str(err) not in _WARNED:
        _WARNED.add(str(err))
        logger.warning("grpo.prompt_once: %s; running whole sequences instead", err)


def repeated_cache(output: object, group_size: int) -> object:
    """The prompt pass's KV cache, each prompt's entries repeated for the ``G`` rows of its group."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise NoPromptCache(
            f"{type(output).__name__} holds no KV cache with batch_repeat_interleave"
        )
    cache.batch_repeat_interleave(group_size)
    return cache


def chunked_head_logps(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
) -> torch.Tensor:
    """``log_softmax(head(hidden) / temperature).gather(index)`` over ``chunk_tokens``
    positions at a time, each chunk recomputed in the backward (activation checkpointing).

    Peak memory for the log-probs is one chunk's ``[N, chunk, V]`` logits instead of every
    sequence's ``[T, V]`` float32 log-softmax kept for the backward: with a 152k vocabulary,
    32 sequences of 512 tokens keep 10 GB there, and 64-token chunks bound it to 1.2 GB.
    """
    parts = [
        checkpoint(
            _head_logps,
            head,
            hidden[:, start : start + chunk_tokens],
            index[:, start : start + chunk_tokens],
            temperature,
            use_reentrant=False,
        )
        for start in range(0, index.shape[1], chunk_tokens)
    ]
    if not parts:
        return torch.empty(index.shape, dtype=torch.float32, device=hidden.device)
    return torch.cat(parts, dim=1)


def _head_logps(
    head: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor, temperature: float
) -> torch.Tensor:
    logits = head(hidden.contiguous()).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


@contextmanager
def contiguous_head_input(model: torch.nn.Module) -> Iterator[None]:
    """Hand the LM head contiguous hidden states while the block runs.

    ``logits_to_keep`` (the training forward's, and ``generate``'s prefill, which keeps only
    the last position) gives the head a strided slice of the hidden states; a matmul on a
    strided 3-D input takes a batched path that copies the [V, H] head weight once per
    sequence (a 49k vocabulary: 450 MB for 8 sequences, half a second on CPU). A contiguous
    copy of the slice is [N, T, H], far smaller, and gives the same logits (bit for bit in
    bf16 on SmolLM2; a float32 matmul may round the last bit differently from the batched one).
    """
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _contiguous_input(_module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])
