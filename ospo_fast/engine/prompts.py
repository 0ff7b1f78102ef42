"""The one image-generation prompt layout and the one position-id rule, shared by generation, the object-mask
pass and training (so that a prompt is tokenised, padded and positioned the same way everywhere).

Janus's image-generation prompt is the chat template (one user turn, the assistant turn opened) followed by
``<begin_of_image>``, exactly as ``JanusProcessor(..., generation_mode="image")`` builds it. Batches are
left-padded, so the last column of every row is ``<begin_of_image>`` and generation continues at the right edge.
"""

from __future__ import annotations

import torch


def image_prompt_inputs(processor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat template + ``<begin_of_image>`` for each prompt, left-padded to the longest.

    Returns input_ids (B, T) int64 and attention_mask (B, T) int64 (0 on padding), on CPU.
    """
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = processor(text=texts, generation_mode="image", padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def prompt_token_ids(processor, prompt: str) -> list[int]:
    """Token ids of one prompt in the layout of ``image_prompt_inputs`` (no padding)."""
    return image_prompt_inputs(processor, [prompt])[0][0].tolist()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them; pads get 0 (they are masked).

    attention_mask: (B, T) with 1 on real tokens. Returns (B, T) int64.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
