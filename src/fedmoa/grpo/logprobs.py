"""Per-token log-probabilities of completions under a causal LM."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them, so that a training
    forward sees exactly the positions the sampler saw."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits).gather(index)`` one row at a time, in float32.

    Materialising the full [N, T, V] log-softmax costs N·T·V floats (hundreds of MB
    for a 49k vocabulary); this keeps one row's worth alive.
    """
    out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    for row, (row_logits, row_index) in enumerate(zip(logits, index, strict=True)):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
        out[row] = picked - torch.logsumexp(row_logits, dim=-1)
    return out


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs [N, T] of ``completion_ids`` given left-padded prompts.

    Logits are divided by the sampling temperature, so the result is the log-prob
    of the distribution the completions were sampled from (before top-p), as in TRL.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    width = completion_ids.shape[1]
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=width + 1,
            use_cache=False,
        ).logits[:, :-1, :]
    finally:
        if handle is not None:
            handle.remove()
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, completion_ids)


def _contiguous_input(_module: torch.nn.Module, args: tuple) -> tuple:
    """``logits_to_keep`` hands the LM head a strided slice of the hidden states; a matmul
    on a strided input that needs grad takes a batched path that copies the [V, H] head
    weight once per sequence, forward and backward (about 2x slower on CPU). A contiguous
    copy of the slice is [N, T, H], far smaller, and gives bitwise-identical logits."""
    return (args[0].contiguous(), *args[1:])
