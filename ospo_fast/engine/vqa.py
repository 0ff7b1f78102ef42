"""Self-VQA: the model answers yes/no questions about its own images (SPEC stage 4).

Each question is an understanding chat with Janus's default system prompt:
``{DEFAULT_SYSTEM_PROMPT}<|User|>: <image_placeholder>\\n{q} Please answer 'yes' or 'no' without explanation.``
then the opened assistant turn. At the last position the softmax runs over the full vocabulary;
p(yes) = max(P("yes"), P("Yes")), p(no) = max(P("no"), P("No")).

Answer tokens: the chat template writes an assistant answer as ``<|Assistant|>: {answer}`` while the generation
prompt ends at ``<|Assistant|>:``, so the first answer token is the first sub-token of " yes" (with the space),
found by rendering both and tokenizing the prompt with and without the answer (``answer_token_ids``).

Cost: each image is encoded once by the vision tower; the (system + image) prefix, identical for all its
questions, runs through the language model once and its KV rows are copied to the K question rows (prefix
caching); the question suffixes of a group of images run as one right-padded batch.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from transformers import DynamicCache
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

VQA_SUFFIX = " Please answer 'yes' or 'no' without explanation."
_PROBE_QUESTION = "Is there a dog?"


def vqa_prompt(processor, question: str) -> str:
    """The full understanding-chat text for one question (one ``<image_placeholder>``), for a Janus processor."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + VQA_SUFFIX}]}]
    return DEFAULT_SYSTEM_PROMPT + processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


def _answer_separator(bundle) -> str:
    """Text the chat template puts between the opened assistant turn and the answer (" " for Janus)."""
    user = {"role": "user", "content": [{"type": "text", "text": _PROBE_QUESTION}]}
    opened = bundle.processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    answered = bundle.processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}], tokenize=False)
    if answered.startswith(opened) and "yes" in answered[len(opened):]:
        return answered[len(opened):].split("yes", 1)[0]
    return " "


def answer_token_ids(bundle) -> dict[str, int]:
    """Token id that starts each answer word ("yes", "Yes", "no", "No") right after the assistant prompt."""
    tokenizer = bundle.tokenizer
    prompt = vqa_prompt(bundle.processor, _PROBE_QUESTION)
    sep = _answer_separator(bundle)
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = {}
    for word in ("yes", "Yes", "no", "No"):
        full = tokenizer(prompt + sep + word, add_special_tokens=False)["input_ids"]
        k = next((j for j, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
        if k < len(base):
            raise ValueError(f"the answer {sep + word!r} merges with the prompt's last token in this tokenizer "
                             f"(position {k}); answer tokens cannot be read from the last position")
        ids[word] = full[k]
    if {ids["yes"], ids["Yes"]} & {ids["no"], ids["No"]}:
        raise ValueError(f"yes/no answer tokens collide: {ids}")
    return ids


def _expand_image_tokens(bundle, text: str) -> str:
    processor = bundle.processor
    one = processor.image_start_token + processor.image_token * processor.num_image_tokens + processor.image_end_token
    return text.replace(processor.image_token, one)


def _as_image(image) -> np.ndarray | PIL.Image.Image:
    if isinstance(image, torch.Tensor):
        return image.cpu().numpy()
    if isinstance(image, (np.ndarray, PIL.Image.Image)):
        return image
    raise TypeError(f"images must be numpy arrays (H, W, 3) or PIL images, got {type(image).__name__}")


def split_prompts(bundle, texts: list[str]) -> tuple[list[int], list[list[int]]]:
    """Tokenize the understanding chats of one image (each with one ``<image_placeholder>``); return the shared
    (system + image) prefix, up to and including the image end token, and each text's suffix after it."""
    tokenizer = bundle.tokenizer
    eoi = tokenizer.convert_tokens_to_ids(bundle.processor.image_end_token)
    rows = [tokenizer(_expand_image_tokens(bundle, text))["input_ids"] for text in texts]
    cut = rows[0].index(eoi) + 1
    prefix = rows[0][:cut]
    for text, row in zip(texts, rows):
        if row[:cut] != prefix:
            raise ValueError(f"{text!r} changes the tokens before the image end; cannot share the prefix")
    return prefix, [row[cut:] for row in rows]


def prefix_cached_hidden(bundle, pixel_values: torch.Tensor, prefix: list[int], suffixes: list[list[int]],
                         owner: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder hidden states of R suffixes, each after the (system + image) prefix of image ``owner[r]``.

    pixel_values (n, 3, S, S); prefix: the shared token ids (``split_prompts``); suffixes: R lists of ids. The
    prefix of each image runs once and its KV rows are copied to that image's suffix rows, which run as one
    right-padded batch. Differentiable (the trainer of the toy model uses it; ``score_yes_no`` runs it under
    no_grad). Returns hidden (R, W, H) and the suffix mask (R, W) (1 on real tokens)."""
    model, device = bundle.model, bundle.device
    lm = model.model.language_model
    n, plen = pixel_values.shape[0], len(prefix)
    prefix_ids = torch.tensor([prefix] * n, device=device)  # (n, P)
    embeds = lm.get_input_embeddings()(prefix_ids)  # (n, P, H)
    features = model.model.get_image_features(pixel_values.to(device, model.dtype)).pooler_output  # (n, N, H)
    slots = (prefix_ids == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
    cache = DynamicCache(config=model.config.text_config)
    lm(inputs_embeds=embeds, attention_mask=torch.ones(n, plen, dtype=torch.long, device=device),
       past_key_values=cache, use_cache=True)
    rows = torch.tensor(owner, device=device)  # (R,)
    pad_id = bundle.tokenizer.pad_token_id
    width = max(len(s) for s in suffixes)
    suffix_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in suffixes], device=device)  # (R, W)
    suffix_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in suffixes], device=device)
    rows_cache = DynamicCache(config=model.config.text_config)
    for layer_idx, layer in enumerate(cache.layers):  # copy the prefix KV to every suffix row
        rows_cache.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), layer_idx)
    mask = torch.cat([suffix_mask.new_ones(len(owner), plen), suffix_mask], dim=1)  # (R, P + W)
    positions = (plen + torch.arange(width, device=device)).expand(len(owner), -1)  # (R, W)
    hidden = lm(inputs_embeds=lm.get_input_embeddings()(suffix_ids), attention_mask=mask, position_ids=positions,
                past_key_values=rows_cache, use_cache=True).last_hidden_state  # (R, W, H)
    return hidden, suffix_mask


def answer_logits(bundle, pixel_values: torch.Tensor, questions: list[list[str]]) -> torch.Tensor:
    """(R, V) next-token logits after each yes/no question (R = all questions of the n images, in order);
    differentiable: ``score_yes_no`` reads probabilities from it, the toy model's build trains on it."""
    prefix, _ = split_prompts(bundle, [vqa_prompt(bundle.processor, questions[0][0])])
    suffixes, owner = [], []
    for i, qs in enumerate(questions):
        pre, suf = split_prompts(bundle, [vqa_prompt(bundle.processor, q) for q in qs])
        if pre != prefix:
            raise ValueError("all images must share one prompt prefix (same processor settings)")
        suffixes += suf
        owner += [i] * len(suf)
    hidden, suffix_mask = prefix_cached_hidden(bundle, pixel_values, prefix, suffixes, owner)
    last = suffix_mask.sum(1) - 1  # (R,) right padding: the last real token
    return bundle.model.lm_head(hidden[torch.arange(len(owner), device=hidden.device), last])  # (R, V)


@torch.no_grad()
def _score_group(bundle, pixel_values: torch.Tensor, questions: list[list[str]], answer_ids: dict[str, int]):
    """pixel_values (n, 3, S, S) for n images, questions[i] its K_i questions -> list of lists of (p_yes, p_no)."""
    probs = answer_logits(bundle, pixel_values, questions).float().softmax(-1)  # (R, V)
    p_yes = torch.maximum(probs[:, answer_ids["yes"]], probs[:, answer_ids["Yes"]]).tolist()
    p_no = torch.maximum(probs[:, answer_ids["no"]], probs[:, answer_ids["No"]]).tolist()
    out, r = [], 0
    for qs in questions:
        out.append([(p_yes[r + k], p_no[r + k]) for k in range(len(qs))])
        r += len(qs)
    return out


def score_yes_no(bundle, images: list, questions: list[list[str]],
                 batch_size: int = 16) -> list[list[tuple[float, float]]]:
    """(p_yes, p_no) for every question of every image.

    images: n images (np.ndarray (H, W, 3) uint8 or PIL.Image); questions: n lists of K_i question strings;
    batch_size: images per prefix batch (their K_i questions run together). Returns n lists of K_i pairs.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} question lists; pass one list per image")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    answer_ids = answer_token_ids(bundle)
    results: list[list[tuple[float, float]]] = [[] for _ in images]
    todo = [i for i, qs in enumerate(questions) if qs]
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        pixels = bundle.processor.image_processor([_as_image(images[i]) for i in idx],
                                                  return_tensors="pt")["pixel_values"]  # (n, 3, S, S)
        for i, scores in zip(idx, _score_group(bundle, pixels, [questions[i] for i in idx], answer_ids)):
            results[i] = scores
    return results
