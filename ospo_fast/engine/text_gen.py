"""Batched, sampled text generation with the Janus language model (stages 1, 2 and 4 write text with it).

Conversations go through the chat template with the assistant turn opened, are left-padded (masked, with position
ids counting real tokens), and decode together; each row stops on its own at an end token and samples with its
own counter-based noise (``engine.sampling``), so a row's text depends only on (conversation, seed, settings).
Temperature 0 is greedy decoding.

Sized per device: the KV cache is a growing ``DynamicCache`` everywhere (attention over the used length only; a
preallocated static cache pays only under CUDA graphs, and text rows stop at very different lengths), and the
stop check, the one host synchronisation of the loop, runs every ``stop_check_interval(device)`` tokens (CPU: every
token, since ops there run synchronously and stopping early saves work; CUDA: every 16, so the GPU runs ahead of
Python). Tokens decoded after a row's stop are masked out, so the result does not depend on the interval. The
step counter (a 0-d int64 tensor advanced in place) and the sampler's hash of the vocabulary (``entry_keys``, built
once per call) live on the device, so between stop checks no token moves data from the host or waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ospo_fast.engine.prompts import position_ids_from_mask
from ospo_fast.engine.sampling import entry_keys, sample_next


@dataclass
class TextSampling:
    """Sampling settings. temperature 0: greedy; top_k 0 / top_p 1.0: off. stop_token_ids: end tokens
    (empty: the tokenizer's EOS)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    stop_token_ids: list[int] = field(default_factory=list)
    stop_check_every: int = 0  # tokens between host-side "all rows stopped?" checks; 0: stop_check_interval(device)


def stop_check_interval(device: torch.device | str) -> int:
    """Tokens between stop checks: 1 on CPU (no asynchronous queue to drain), 16 on accelerators (each check
    drains the queue; 16 keeps the wasted steps after the last stop under 16 / max_new_tokens of the work)."""
    return 1 if torch.device(device).type == "cpu" else 16


def chat_inputs(bundle, conversations: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat template with the assistant turn opened, left-padded: input_ids (B, T), attention_mask (B, T)."""
    processor = bundle.processor
    texts = [processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
             for conv in conversations]
    enc = processor(text=texts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _check(conversations, config: TextSampling, seeds) -> None:
    if not conversations:
        raise ValueError("conversations is empty; pass at least one conversation (a list of role/content dicts)")
    if len(seeds) != len(conversations):
        raise ValueError(f"got {len(conversations)} conversations but {len(seeds)} seeds; pass one seed per row")
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} must be >= 1")
    if config.temperature < 0:
        raise ValueError(f"temperature={config.temperature} must be >= 0 (0 is greedy)")
    if config.stop_check_every < 0:
        raise ValueError(f"stop_check_every={config.stop_check_every} must be >= 0 (0: per device)")


def _attention_mask(full_mask: torch.Tensor, prompt_len: int, step: int) -> torch.Tensor:
    """The 4-D boolean mask (B, 1, Tq, Tk) of forward ``step``; full_mask (B, T + max_new_tokens) bool, the prompt's
    padding mask then ones. Step 0 is the prompt (causal, padding keys hidden; a padding query sees itself so that
    no row is empty), step i > 0 one query over the T + i cached keys (a view). Built here so that transformers
    does not inspect the mask on the host (its own mask building checks ``padding_mask.all()``: one
    synchronisation per token)."""
    if step == 0:
        keys = full_mask[:, :prompt_len]  # (B, T)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=keys.device).tril()  # (T, T)
        eye = torch.eye(prompt_len, dtype=torch.bool, device=keys.device)
        return (causal & keys[:, None, :] | eye)[:, None]  # (B, 1, T, T)
    return full_mask[:, None, None, :prompt_len + step]  # (B, 1, 1, T + i)


@torch.no_grad()
def generate_text_ids(bundle, conversations: list[list[dict]], config: TextSampling,
                      seeds: list[int]) -> list[list[int]]:
    """New token ids per row, up to and excluding the first stop token (at most max_new_tokens)."""
    _check(conversations, config, seeds)
    model, device = bundle.model, bundle.device
    stops = torch.as_tensor(config.stop_token_ids or [bundle.tokenizer.eos_token_id], device=device)
    input_ids, mask = chat_inputs(bundle, conversations)
    input_ids, mask = input_ids.to(device), mask.to(device)
    batch, prompt_len = input_ids.shape
    check_every = config.stop_check_every or stop_check_interval(device)
    cache = DynamicCache(config=model.config.text_config)
    full_mask = torch.cat([mask.bool(), mask.new_ones(batch, config.max_new_tokens, dtype=torch.bool)], dim=1)
    positions = position_ids_from_mask(mask)  # (B, T)
    seeds_t = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    lm = model.model.language_model
    out = torch.full((batch, config.max_new_tokens), -1, dtype=torch.int64, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)  # the sampler's token index, advanced in place
    keys = None  # entry_keys(V): the vocabulary's part of the sampler's hash, built at the first seeded step
    embeds = lm.get_input_embeddings()(input_ids)  # (B, T, H)
    for i in range(config.max_new_tokens):
        step_mask = _attention_mask(full_mask, prompt_len, i)
        hidden = lm(inputs_embeds=embeds, attention_mask=step_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # (B, H)
        logits = model.lm_head(hidden)  # (B, V)
        if keys is None and config.temperature > 0:
            keys = entry_keys(logits.shape[-1], device)
        token = sample_next(logits, seeds_t, step, config.temperature, config.top_k, config.top_p, keys=keys)
        step += 1
        token = token.masked_fill(done, -1)
        out[:, i] = token
        done |= torch.isin(token, stops)
        if (i + 1) % check_every == 0 and bool(done.all()):  # the loop's only host sync
            break
        embeds = lm.get_input_embeddings()(token.clamp(min=0))[:, None]  # (B, 1, H)
        positions = positions[:, -1:] + 1
    stop_set = set(stops.tolist())
    rows = []
    for row in out.tolist():
        ends = [j for j, t in enumerate(row) if t < 0 or t in stop_set]
        rows.append(row[:ends[0]] if ends else row)
    return rows


def generate_text(bundle, conversations: list[list[dict]], config: TextSampling, seeds: list[int]) -> list[str]:
    """Generate one reply per conversation (a list of {"role", "content"} messages); returns decoded texts
    without special tokens. seeds: one int per conversation."""
    ids = generate_text_ids(bundle, conversations, config, seeds)
    return [bundle.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
