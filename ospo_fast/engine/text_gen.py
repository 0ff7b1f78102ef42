"""Batched, sampled text generation with the Janus language model (stages 1, 2 and 4 write text with it).

Conversations go through the chat template with the assistant turn opened, are left-padded (masked, with position
ids counting real tokens), and decode together; each row stops on its own at an end token and samples with its
own counter-based noise (``engine.sampling``), so a row's text depends only on (conversation, seed, settings).
The KV cache is a preallocated ``StaticCache`` on CUDA (fixed shapes) and a growing ``DynamicCache`` on CPU
(attention over the used length only). Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache

from ospo_fast.engine.prompts import position_ids_from_mask
from ospo_fast.engine.sampling import sample_next


@dataclass
class TextSampling:
    """Sampling settings. temperature 0: greedy; top_k 0 / top_p 1.0: off. stop_token_ids: end tokens
    (empty: the tokenizer's EOS)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    stop_token_ids: list[int] = field(default_factory=list)


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
    cache_len = prompt_len + config.max_new_tokens
    static = device.type == "cuda"
    cache = (StaticCache(config=model.config.text_config, max_cache_len=cache_len) if static
             else DynamicCache(config=model.config.text_config))
    full_mask = torch.cat([mask, mask.new_ones(batch, config.max_new_tokens)], dim=1)  # (B, L)
    positions = position_ids_from_mask(mask)  # (B, T)
    seeds_t = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    lm = model.model.language_model
    out = torch.full((batch, config.max_new_tokens), -1, dtype=torch.int64, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    embeds = lm.get_input_embeddings()(input_ids)  # (B, T, H)
    for i in range(config.max_new_tokens):
        step_mask = full_mask if static else full_mask[:, :prompt_len + i]  # dynamic: keys seen so far
        hidden = lm(inputs_embeds=embeds, attention_mask=step_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # (B, H)
        token = sample_next(model.lm_head(hidden), seeds_t, i, config.temperature, config.top_k, config.top_p)
        token = token.masked_fill(done, -1)
        out[:, i] = token
        done |= torch.isin(token, stops)
        if bool(done.all()):
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
