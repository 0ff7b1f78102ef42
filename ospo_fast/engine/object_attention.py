"""Object-attention capture: the attention that image-token queries pay to object-word keys, without ever
materialising the attention matrix (SPEC stage 3).

The reference code runs a second eager forward with ``output_attentions=True`` and reads
``attn[layer][b, head, query, key]``. Here a registered transformers attention implementation
(``transformers.AttentionInterface``) computes each layer's output with SDPA as usual and, for the selected layers
and the captured rows only, the probabilities of just the S object keys::

    p[b, h, q, s] = exp(q . k_s * scaling - logsumexp_{visible keys k}(q . k * scaling))

The logsumexp is streamed over query chunks whose (chunk, Tk) score block for all heads stays under
``chunk_elements`` numbers; the attention mask (left padding, causality, static-cache slots) is respected exactly as
SDPA sees it. Captured values are averaged over heads, selected layers and sub-tokens into per-cell maps.

Public API:
- ``ObjectAttentionCapture(key_positions, layers, num_cells)`` with ``recording(model)``, ``set_cells(start)``,
  ``maps()``: used by the generation engine step by step, or by a single teacher-forced forward;
- ``object_token_positions(tokenizer, input_ids, objects)``: object words -> sub-token key positions;
- ``teacher_forced_object_maps(bundle, prompts, image_tokens, objects, skip_layers)``: one batched forward of
  [chat prompt + <begin_of_image>] + image tokens -> (B, O, G, G) maps;
- ``encode_pixels_to_tokens(bundle, pixels)``: the reference-style path, PNG pixels -> VQ tokens.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ospo_fast.ops.object_masks import select_layers

ATTENTION_NAME = "ospo_object_capture"
_ACTIVE: dict[int, ObjectAttentionCapture] = {}  # id(language-model config) -> the capture recording it


def _capturing_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA attention that also hands (query, key, mask) of the selected layers to the active capture."""
    capture = _ACTIVE.get(id(module.config))
    if capture is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        capture._record(module.layer_idx, query, key, attention_mask, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, _capturing_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # masks exactly as SDPA receives them


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder whose attention is captured: JanusForConditionalGeneration, JanusModel or the LM itself."""
    for path in ("model.language_model", "language_model"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None:
            return obj
    if hasattr(model, "layers") and hasattr(model, "config"):
        return model
    raise ValueError(f"cannot find a language model in {type(model).__name__}; pass a Janus model or its decoder")


class ObjectAttentionCapture:
    """Accumulates object-attention maps over forwards.

    key_positions: (B, O, S) long, KV-sequence positions (cache slots) of each object's sub-tokens, -1 = padding;
    layers: decoder layer indices to average; num_cells: cells per image (G*G). Only the first B batch rows of a
    forward are captured (with CFG the unconditional rows follow them). ``set_cells(start)`` says that the queries of
    the next forward are cells start, start+1, ...; cells outside [0, num_cells) are ignored. Call it before every
    forward: recording a layer twice for one ``set_cells`` raises. ``chunk_elements`` bounds the score block
    (queries x keys x heads x rows) held at once.
    """

    def __init__(self, key_positions: torch.Tensor, layers: list[int], num_cells: int,
                 chunk_elements: int = 1 << 21) -> None:
        if key_positions.dim() != 3:
            raise ValueError(f"key_positions must be (B, O, S), got shape {tuple(key_positions.shape)}")
        if not layers:
            raise ValueError("layers is empty; use ospo_fast.ops.object_masks.select_layers(num_layers)")
        if num_cells < 1:
            raise ValueError(f"num_cells={num_cells} must be >= 1 (grid * grid)")
        self.key_positions = key_positions.long()
        self.layers = sorted(set(int(i) for i in layers))
        self.num_cells = int(num_cells)
        self.chunk_elements = int(chunk_elements)
        b, o, s = key_positions.shape
        valid = self.key_positions >= 0
        self._max_position = int(self.key_positions.max()) if self.key_positions.numel() else -1
        self._weights = valid.float() / valid.sum(-1, keepdim=True).clamp(min=1)  # (B, O, S) sub-token mean
        self._gather = self.key_positions.clamp(min=0).view(b, 1, 1, o * s)  # (B, 1, 1, O*S)
        # Accumulators live on the device of the first recorded forward: no host sync while decoding.
        self._sums = torch.zeros(b, o, self.num_cells, dtype=torch.float64)
        self._counts = torch.zeros(self.num_cells, dtype=torch.int64)
        self._start: int | None = None
        self._seen: set[int] = set()

    def _to(self, device: torch.device) -> None:
        if self._sums.device != device:
            self._weights, self._gather = self._weights.to(device), self._gather.to(device)
            self._sums, self._counts = self._sums.to(device), self._counts.to(device)

    @property
    def batch_size(self) -> int:
        return self.key_positions.shape[0]

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module) -> Iterator[ObjectAttentionCapture]:
        """Make ``model``'s language model use the capturing attention; restores the original on exit."""
        lm = _language_model(model)
        config = lm.config
        if id(config) in _ACTIVE:
            raise RuntimeError("this model is already recording with another ObjectAttentionCapture; nest none")
        original = config._attn_implementation
        _register()
        lm.set_attn_implementation(ATTENTION_NAME)
        _ACTIVE[id(config)] = self
        try:
            yield self
        finally:
            _ACTIVE.pop(id(config), None)
            lm.set_attn_implementation(original)

    def set_cells(self, start: int | None) -> None:
        """Queries of the next forward are cells start, start+1, ...; None stops capturing."""
        self._start = None if start is None else int(start)
        self._seen = set()

    def captured_cells(self) -> torch.Tensor:
        """(num_cells,) bool: cells that received at least one layer's attention."""
        return self._counts > 0

    def maps(self) -> torch.Tensor:
        """(B, O, num_cells) float32 on the recording device: mean over the selected layers, heads and sub-tokens.
        Cells never captured are NaN (object_masks then raises naming the image): a missed step cannot pass silently."""
        counts = self._counts.to(self._sums.dtype)
        out = torch.where(counts > 0, self._sums / counts.clamp(min=1), float("nan"))
        return out.float()

    # -- recording ------------------------------------------------------------------------------------------------
    def _record(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                scaling: float) -> None:
        if self._start is None or layer not in self.layers:
            return
        if layer in self._seen:
            raise RuntimeError(f"layer {layer} was recorded twice for set_cells({self._start}); call "
                               "capture.set_cells(start) before every forward")
        self._seen.add(layer)
        tq = query.shape[2]
        q0, q1 = max(0, -self._start), min(tq, self.num_cells - self._start)
        if q0 >= q1:
            return
        b = self.batch_size
        if query.shape[0] < b:
            raise ValueError(f"the forward has {query.shape[0]} rows but the capture expects at least {b} images")
        self._to(query.device)
        columns = self._object_columns(query[:b], key[:b], mask, scaling, q0, q1)  # (B, O, q1 - q0)
        cells = slice(self._start + q0, self._start + q1)
        self._sums[:, :, cells] += columns.to(torch.float64)
        self._counts[cells] += 1

    def _object_columns(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                        q0: int, q1: int) -> torch.Tensor:
        """Queries q0:q1 of (B, H, Tq, D) against keys (B, Hkv, Tk, D) -> (B, O, q1 - q0) head/sub-token means."""
        b, h, tq, d = query.shape
        hkv, tk = key.shape[1], key.shape[2]
        groups = h // hkv
        if self._max_position >= tk:
            raise ValueError(f"key position {self._max_position} is beyond the {tk} keys of this forward; "
                             "key_positions must index the KV sequence (cache slots)")
        o, s = self.key_positions.shape[1:]
        gather_idx, weights = self._gather, self._weights  # (B, 1, 1, O*S), (B, O, S)
        k = key.float()
        chunk = max(1, self.chunk_elements // max(1, b * h * tk))
        out = []
        for c0 in range(q0, q1, chunk):
            c1 = min(q1, c0 + chunk)
            q = query[:, :, c0:c1].float().reshape(b, hkv, groups * (c1 - c0), d)  # (B, Hkv, g*C, D)
            scores = torch.matmul(q, k.transpose(-1, -2)).view(b, h, c1 - c0, tk) * scaling  # (B, H, C, Tk)
            scores = scores + self._additive_mask(mask, b, tq, tk, c0, c1, query.device)
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, C, 1)
            picked = scores.gather(-1, gather_idx.expand(b, h, c1 - c0, o * s))  # (B, H, C, O*S)
            probs = torch.exp(picked - lse).mean(dim=1).view(b, c1 - c0, o, s)  # (B, C, O, S)
            out.append((probs * weights[:, None]).sum(-1).transpose(1, 2))  # (B, O, C)
        return torch.cat(out, dim=-1)

    @staticmethod
    def _additive_mask(mask: torch.Tensor | None, b: int, tq: int, tk: int, c0: int, c1: int,
                       device: torch.device) -> torch.Tensor:
        """The mask SDPA applies to queries c0:c1, as an additive float32 (B or 1, 1, C, Tk) tensor."""
        if mask is None:  # SDPA: upper-left causal when Tq > 1, everything visible for one query
            if tq == 1:
                return torch.zeros(1, 1, 1, tk, device=device)
            rows = torch.arange(c0, c1, device=device)[:, None]
            visible = torch.arange(tk, device=device)[None, :] <= rows
        else:
            rows = mask[:b] if mask.shape[0] > 1 else mask  # (B or 1, 1, Tq or 1, Tk)
            visible = rows[:, :, c0:c1, :tk] if rows.shape[2] > 1 else rows[..., :tk]
            if visible.dtype != torch.bool:
                return visible.float()
        return torch.zeros(visible.shape, device=device).masked_fill(~visible, float("-inf"))


# -- object words -> key positions -------------------------------------------------------------------------------
def _token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token on its own; special tokens become a NUL that no word can match across."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return ["\x00" if i in special else tokenizer.convert_tokens_to_string([t]) for i, t in zip(ids, tokens)]


def object_token_positions(tokenizer, input_ids: torch.Tensor, objects: list[list[str]]) -> torch.LongTensor:
    """Sub-token positions of each object word in each row of ``input_ids``.

    input_ids: (B, T) long (left padding allowed); objects: B lists of words or phrases ("car", "traffic light").
    Tokens are decoded one by one to characters, the word is found case-insensitively on word boundaries
    (first occurrence; special tokens never match) and every token overlapping it is taken, so BPE splits and
    leading-space tokens are handled whatever the merges. Returns (B, O, S) long with O = the longest object list,
    -1 for padding; a word not found raises ValueError naming the word and the prompt.
    """
    if input_ids.dim() != 2 or len(objects) != input_ids.shape[0]:
        raise ValueError(f"input_ids must be (B, T) with one object list per row; got {tuple(input_ids.shape)} and "
                         f"{len(objects)} lists")
    found: list[list[list[int]]] = []
    for row, words in zip(input_ids.tolist(), objects):
        pieces = _token_pieces(tokenizer, row)
        starts, pos = [], 0
        for piece in pieces:
            starts.append(pos)
            pos += len(piece)
        text = "".join(pieces)
        spans = []
        for word in words:
            match = re.search(rf"(?<![\w]){re.escape(word.strip())}(?![\w])", text, flags=re.IGNORECASE)
            if not word.strip() or match is None:
                prompt = text.replace("\x00", " ").strip()
                raise ValueError(f"object word {word!r} does not occur in the prompt {prompt!r}; take objects from "
                                 "the prompt's structure so that each one appears in its text")
            a, z = match.span()
            spans.append([t for t, st in enumerate(starts) if st < z and st + len(pieces[t]) > a])
        found.append(spans)
    o = max((len(s) for s in found), default=0)
    s = max((len(t) for spans in found for t in spans), default=1)
    out = torch.full((len(found), max(o, 1), s), -1, dtype=torch.long)
    for bi, spans in enumerate(found):
        for oi, toks in enumerate(spans):
            out[bi, oi, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out


def objects_valid(objects: list[list[str]]) -> torch.Tensor:
    """(B, O) bool: True for real objects, False for the padding of shorter lists."""
    o = max(1, max((len(w) for w in objects), default=0))
    return torch.tensor([[i < len(w) for i in range(o)] for w in objects], dtype=torch.bool)


# -- teacher-forced maps -------------------------------------------------------------------------------------------
def generation_prompt_inputs(processor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Chat-templated image-generation prompts ending in <begin_of_image>, left-padded: input_ids, attention_mask."""
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in prompts]
    enc = processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def teacher_forced_inputs(bundle, prompts: list[str], image_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embeddings of [prompt + <begin_of_image>] + image tokens: inputs_embeds (B, T+N, D), attention_mask,
    position_ids (left padding aware), and input_ids (B, T) of the text part."""
    model = bundle.model
    device = bundle.device
    text = generation_prompt_inputs(bundle.processor, prompts)
    ids, attn = text["input_ids"].to(device), text["attention_mask"].to(device)
    lm = model.model.language_model
    image_tokens = image_tokens.to(device)
    embeds = torch.cat([lm.get_input_embeddings()(ids),
                        model.prepare_embeddings_for_image_generation(image_tokens)], dim=1)  # (B, T+N, D)
    attn = torch.cat([attn, torch.ones_like(image_tokens)], dim=1)  # (B, T+N)
    position_ids = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1)
    return {"inputs_embeds": embeds, "attention_mask": attn, "position_ids": position_ids, "input_ids": ids}


@torch.no_grad()
def teacher_forced_object_maps(bundle, prompts: list[str], image_tokens: torch.Tensor, objects: list[list[str]],
                               skip_layers: int = 5) -> torch.Tensor:
    """Object-attention maps from one batched teacher-forced forward (SPEC stage 3, context ``base``).

    prompts: B prompt strings; image_tokens: (B, N) long VQ tokens (N = G*G); objects: B lists of object words.
    Cell j is the query whose input is image token j. Returns (B, O, G, G) float32 (padded objects: zeros).
    """
    if image_tokens.dim() != 2 or image_tokens.shape[0] != len(prompts) or len(objects) != len(prompts):
        raise ValueError(f"need image_tokens (B, N) and B prompts and object lists; got {tuple(image_tokens.shape)}, "
                         f"{len(prompts)} prompts, {len(objects)} object lists")
    n = image_tokens.shape[1]
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"image_tokens has {n} tokens per image, not a square grid")
    inputs = teacher_forced_inputs(bundle, prompts, image_tokens)
    positions = object_token_positions(bundle.tokenizer, inputs["input_ids"], objects)
    t = inputs["input_ids"].shape[1]
    capture = ObjectAttentionCapture(positions, select_layers(bundle.num_layers, skip_layers), num_cells=n)
    with capture.recording(bundle.model):
        capture.set_cells(-t)  # query t + j has image token j as input
        bundle.model.model.language_model(inputs_embeds=inputs["inputs_embeds"],
                                          attention_mask=inputs["attention_mask"],
                                          position_ids=inputs["position_ids"], use_cache=False)
    return capture.maps().view(len(prompts), -1, grid, grid)


@torch.no_grad()
def encode_pixels_to_tokens(bundle, pixels: torch.Tensor) -> torch.Tensor:
    """Reference-style path: re-encode images (as saved PNGs) to VQ tokens.

    pixels: (B, H, W, 3) uint8 (as read from PNG) with H = W = grid * 16. Returns (B, grid * grid) long tokens.
    """
    if pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be (B, H, W, 3) uint8, got shape {tuple(pixels.shape)}")
    side = bundle.grid * 16
    if pixels.shape[1] != side or pixels.shape[2] != side:
        raise ValueError(f"pixels are {pixels.shape[1]}x{pixels.shape[2]}, the VQ encoder of this model needs "
                         f"{side}x{side}; resize the image first")
    vq = bundle.model.model.vqmodel
    dtype = next(vq.parameters()).dtype
    x = pixels.to(bundle.device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    tokens = vq.encode(x).image_tokens  # (B * grid * grid,)
    return tokens.view(pixels.shape[0], -1)
