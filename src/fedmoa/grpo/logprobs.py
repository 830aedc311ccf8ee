"""Per-token log-probabilities of completions under a causal LM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


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
) -> torch.Tensor:
    """Log-probs [N, T] of ``completion_ids`` given left-padded prompts.

    Logits are divided by the sampling temperature, so the result is the log-prob
    of the distribution the completions were sampled from (before top-p), as in TRL.

    ``chunk_tokens > 0``: the LM head and the log-softmax run over that many completion
    positions at a time and are recomputed in the backward (:func:`chunked_head_logps`), so
    no ``[T, V]`` float32 tensor per sequence is kept for the backward, only the final hidden
    states ``[N, T, H]``. Same values within float rounding.
    """
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
