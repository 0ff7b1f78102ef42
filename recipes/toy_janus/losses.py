"""The objectives of the decoder phases (mm, t2i, und): text-to-image NLL as Janus ``generate`` conditions it, the
diagnostic object-attention loss, and the understanding losses (yes/no answers and captions) read the way Self-VQA
reads. The T2I and VQA prompts are the library's (``image_prompt_inputs``, ``vqa_prompt``): the toy is trained on
the layout that the pipeline uses it with."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

from ospo_fast.engine.object_attention import object_token_positions
from ospo_fast.engine.prompts import image_prompt_inputs
from ospo_fast.engine.vqa import vqa_prompt
from ospo_fast.toy import world
from recipes.toy_janus.data import UND_QUESTION_KINDS, answer_ids, make_question, object_regions, scene_batch


def t2i_loss(model, processor, captions: list[str], tokens: torch.Tensor, uncond: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NLL of image tokens (B, 64) under the generation head, conditioned as Janus ``generate`` does;
    rows with ``uncond`` set see BOS, pads and ``<begin_of_image>`` only (the CFG branch). ``weights`` (B, 64):
    a weighted mean instead (``object_cell_weights``)."""
    return t2i_forward(model, processor, captions, tokens, uncond, weights=weights)[0]


def t2i_forward(model, processor, captions: list[str], tokens: torch.Tensor, uncond: torch.Tensor,
                 output_attentions: bool = False,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """``t2i_loss``'s forward: (NLL, the text ids (B, T) as fed, the decoder's attention probabilities per layer
    (B, heads, T + 63, T + 63) when ``output_attentions``, which needs the eager attention)."""
    ids, mask = image_prompt_inputs(processor, captions)  # (B, T), the library's prompt layout
    tok = processor.tokenizer
    keep = (ids == tok.bos_token_id) | (ids == tok.convert_tokens_to_ids(tok.boi_token))
    ids = torch.where(uncond[:, None] & ~keep, torch.full_like(ids, tok.pad_token_id), ids)
    text = model.get_input_embeddings()(ids)  # (B, T, H)
    image = model.prepare_embeddings_for_image_generation(tokens[:, :-1])  # (B, 63, H)
    attention = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)  # (B, T + 63)
    out = model.model.language_model(inputs_embeds=torch.cat([text, image], 1), attention_mask=attention,
                                     output_attentions=output_attentions)
    logits = model.model.generation_head(out.last_hidden_state[:, ids.shape[1] - 1:])  # (B, 64, K)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1), reduction="none")
    nll = nll.mean() if weights is None else (nll * weights.reshape(-1)).sum() / weights.sum()
    return nll, ids, out.attentions if output_attentions else None


def object_attention_loss(attentions: tuple, ids: torch.Tensor, tokenizer, scenes: list, uncond: torch.Tensor,
                          layers: list[int], min_cover: float) -> torch.Tensor:
    """Supervision for the decoder's eyes: where the pipeline reads object masks (SPEC stage 3: the attention of
    image-token queries to an object word's sub-tokens, averaged over heads and the mask layers ``layers``), the
    map, normalised over the image's cells, should spread over the cells the object covers. Cross-entropy of the
    uniform distribution on the object's region (``object_regions``) against that normalised map, averaged over
    the conditional rows' shape words. Cells follow the library's rule: the query whose input is image token j is
    cell j (cells 0..62 here; training feeds 63 image tokens).

    attentions: per layer (B, heads, T + 63, T + 63); ids: (B, T) the text as fed."""
    t = ids.shape[1]
    maps = torch.stack([attentions[i] for i in layers]).mean(dim=(0, 2))[:, t:, :]  # (B, 63, T + 63)
    terms = []
    for row, scene in enumerate(scenes):
        if uncond[row]:
            continue
        regions = object_regions(scene, min_cover)
        words = list(regions)
        positions = object_token_positions(tokenizer, ids[row:row + 1], [words])[0]  # (O, S), -1 padding
        for word, subtokens in zip(words, positions):
            region = regions[word][:maps.shape[1]]
            if not region.any():
                continue
            attended = maps[row][:, subtokens[subtokens >= 0]].mean(-1)  # (63,)
            share = attended / attended.sum().clamp_min(1e-12)
            terms.append(-(torch.log(share.clamp_min(1e-12))[region]).mean())
    return torch.stack(terms).mean() if terms else maps.new_zeros(())


def vqa_logits(model, processor, images: np.ndarray, questions: list[str]) -> torch.Tensor:
    """Next-token logits (B, V) after the understanding chat for each (image uint8 (64,64,3), question)."""
    enc = processor(text=[vqa_prompt(processor, q) for q in questions], images=list(images),
                    return_tensors="pt", padding=True)
    dev = next(model.parameters()).device
    out = model(input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev),
                pixel_values=enc.pixel_values.to(dev, next(model.parameters()).dtype), logits_to_keep=1)
    return out.logits[:, -1].float()


CAPTION_REQUEST = "Describe the image."


def caption_loss(model, processor, images: np.ndarray, captions: list[str]) -> torch.Tensor:
    """Auxiliary understanding loss, one full left-padded sequence per image: NLL of the caption (+ end of sentence)
    as the assistant's answer to ``<image_placeholder>\nDescribe the image.``; it teaches the decoder to read the
    image tokens, which the balanced yes/no task alone does not start to do. The phases train through
    ``shared_prefix_understanding``; this is its reference (tests)."""
    tok = processor.tokenizer
    texts = [caption_text(processor, c) for c in captions]
    enc = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    lengths = [len(tok(" " + c + tok.eos_token, add_special_tokens=False)["input_ids"]) for c in captions]
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   pixel_values=enc.pixel_values).logits  # (B, T, V); left padding: answers end each row
    width = max(lengths)
    labels = enc.input_ids[:, -width:].clone()  # (B, width)
    for row, n in enumerate(lengths):
        labels[row, : width - n] = -100
    return F.cross_entropy(logits[:, -width - 1:-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)


def caption_text(processor, caption: str) -> str:
    """The captioning chat with its answer: ``<image_placeholder>\nDescribe the image.`` then `` {caption}<eos>``."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_REQUEST}]}
    prompt = DEFAULT_SYSTEM_PROMPT + processor.apply_chat_template([user], add_generation_prompt=True)
    return prompt + " " + caption + processor.tokenizer.eos_token


def shared_prefix_understanding(model, processor, images: np.ndarray, questions: list[list[str]],
                                captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The understanding losses the way Self-VQA reads (``ospo_fast.engine.vqa.prefix_cached_hidden``): each
    image's (system + image) prefix runs once and its K questions and its caption chat run as suffixes on a copy
    of its KV, so K answers per image cost K short suffixes instead of K full sequences.
    Returns the answer logits (sum K, V) and the caption NLL per token (scalar)."""
    from ospo_fast.engine.vqa import prefix_cached_hidden, split_prompts
    from ospo_fast.models.loader import JanusBundle

    bundle = JanusBundle(model, processor, "toy build")
    tok = processor.tokenizer
    prefix, suffixes, owner, kinds = None, [], [], []
    for i, (qs, caption) in enumerate(zip(questions, captions)):
        pre, suf = split_prompts(bundle, [vqa_prompt(processor, q) for q in qs] + [caption_text(processor, caption)])
        prefix = prefix or pre
        if pre != prefix:
            raise ValueError("all images must share one prompt prefix")
        suffixes += suf
        owner += [i] * len(suf)
        kinds += ["vqa"] * len(qs) + ["caption"]
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    hidden, mask = prefix_cached_hidden(bundle, pixels, prefix, suffixes, owner)  # (R, W, H), (R, W)
    last = mask.sum(1) - 1  # (R,)
    is_vqa = torch.tensor([k == "vqa" for k in kinds])
    rows = torch.arange(len(owner))
    answer = model.lm_head(hidden[rows[is_vqa], last[is_vqa]])  # (sum K, V)
    # caption rows: the last n tokens are " {caption}<eos>", each predicted by the hidden state one position earlier
    caption_rows = rows[~is_vqa].tolist()
    picks, targets = [], []
    for row, caption in zip(caption_rows, captions):
        n = len(tok(" " + caption + tok.eos_token, add_special_tokens=False)["input_ids"])
        end = int(last[row]) + 1
        picks += [(row, j - 1) for j in range(end - n, end)]
        targets += suffixes[row][end - n:end]
    r, c = torch.tensor(picks).T
    caption_nll = F.cross_entropy(model.lm_head(hidden[r, c]).float(), torch.tensor(targets))
    return answer.float(), caption_nll


def understanding_batch(model, processor, rng: np.random.Generator, batch: int,
                        questions_per_image: int) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """One understanding batch of phases mm and und: ``batch`` scenes, ``questions_per_image`` balanced yes/no
    questions each (``UND_QUESTION_KINDS``) and the caption, through ``shared_prefix_understanding``.
    Returns the answer cross-entropy, the caption NLL and, per question, whether yes/no was ranked right."""
    yes_id, no_id = answer_ids(processor.tokenizer)
    scenes, images = scene_batch(rng, batch)
    answers = rng.random((batch, questions_per_image)) < 0.5  # (B, K)
    questions = [[make_question(world.spec_of(s), rng, bool(a), UND_QUESTION_KINDS) for a in row]
                 for s, row in zip(scenes, answers)]
    target = torch.tensor([yes_id if a else no_id for a in answers.ravel()])
    logits, loss_cap = shared_prefix_understanding(model, processor, images, questions,
                                                   [world.caption(s) for s in scenes])  # (B K, V)
    correct = ((logits[:, yes_id] > logits[:, no_id]) == torch.from_numpy(answers.ravel())).tolist()
    return F.cross_entropy(logits, target), loss_cap, correct
