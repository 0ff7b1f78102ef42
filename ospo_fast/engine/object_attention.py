"""Object-attention capture: the attention that image-token queries pay to object-word keys, without ever
materialising the attention matrix (SPEC stage 3).

The reference code runs a second eager forward with ``output_attentions=True`` and reads
``attn[layer][b, head, query, key]``. Here the engine's attention (``engine.attention``, registered through
``transformers.AttentionInterface``) hands the capture, for the selected layers and the captured rows only, the
probabilities of just the S object keys::

    p[b, h, q, s] = exp(q . k_s * scaling - logsumexp_{visible keys k}(q . k * scaling))

- In a decode step of the image engine the decode attention (``ops.decode_attention``) computes them from its own
  log-sum-exp over the filled slots (``record_probabilities``): no copy of K, no pass over the cache of its own.
- In a multi-query forward (a teacher-forced pass, a prefill) the engine's attention computes the layer's output
  and its log-sum-exp in one SDPA kernel (``ops.decode_attention.attention_with_lse``) and hands the lse over
  (``_record(..., lse=)``): the capture then scores only the S object keys, in blocks of ``chunk_elements`` numbers
  (a fixed size per device). A teacher-forced pass stops after the last selected layer. Without an lse (``_record``
  called directly) the logsumexp is streamed over query chunks of the full (chunk, Tk) score block. Either way
  the attention mask (left padding, causality) is respected exactly as SDPA sees it.
Captured values are averaged over heads, selected layers and sub-tokens into per-cell maps.

Public API:
- ``ObjectAttentionCapture(key_positions, layers, num_cells)`` with ``recording(model)``, ``set_cells(start)``,
  ``maps()``: forwards inside ``recording`` capture when called with ``object_capture=capture``; used by the
  compiled decode step (cells from its device step counter) or by a single teacher-forced forward;
- ``capture_chunk_elements(device)``: the score-block size per device (fixed: CPU cache-sized, CUDA 256 MiB);
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

from ospo_fast.engine.attention import ForwardStopped, engine_attention_on
from ospo_fast.engine.prompts import image_prompt_inputs, position_ids_from_mask
from ospo_fast.ops.object_masks import CapturedScores, maps_from_scores_ref, select_layers

CPU_CHUNK_ELEMENTS = 1 << 21  # 8 MiB of float32 scores: stays in a CPU core's caches
CUDA_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32 scores


def capture_chunk_elements(device: torch.device | str) -> int:
    """How many attention scores (queries x keys x heads x rows) the capture holds at once on ``device``: a fixed
    block, never a share of free memory (which the KV cache and CUDA graphs' pools make unpredictable). CPU:
    ``CPU_CHUNK_ELEMENTS`` (cache-sized blocks are fastest there); CUDA: ``CUDA_CHUNK_ELEMENTS``. With the
    attention's own lse the block holds only object-key scores: a Janus-Pro teacher-forced pass (16 images x 16
    heads x 16 object keys) is one block per layer."""
    return CUDA_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CPU_CHUNK_ELEMENTS


class ObjectAttentionCapture:
    """Accumulates object-attention maps over forwards, as fixed-shape tensor work (no Python state per forward,
    so it runs inside a compiled, CUDA-graphed decode step).

    key_positions: (B, O, S) long, KV-sequence positions (cache slots) of each object's sub-tokens, -1 = padding;
    layers: decoder layer indices to average; num_cells: cells per image (G*G). A forward records only when it is
    given ``object_capture=capture`` inside ``capture.recording(model)``; only its first B rows are captured (with
    CFG the unconditional rows follow them). ``set_cells(start)`` says that the queries of the next forwards are
    cells start, start+1, ...; start is an int, or a 0-d int64 tensor on the device that the caller advances in
    place (the compiled decode step's own counter). Cells outside [0, num_cells) are ignored. Accumulators are
    float32 (B, O*S, num_cells) sums over heads and layers per sub-token and (num_cells,) per-cell layer counts,
    updated with ``index_add_``; ``scores(grid)`` hands them to ``ospo_fast.ops.object_masks.object_masks_from_scores``
    (heads, layers and sub-tokens are averaged there), ``maps()`` averages them here.
    ``chunk_elements`` bounds the score block (queries x keys x heads x rows) held at once; default
    ``capture_chunk_elements(device of key_positions)``. ``heads`` ({layer: head indices}, e.g. localisation heads,
    ``engine.localization_heads``) restricts the average to those (layer, head) pairs: their layers are the
    captured layers, counts then count pairs and ``heads`` is 1, so the fused op's mean is over the pairs.
    """

    def __init__(self, key_positions: torch.Tensor, layers: list[int], num_cells: int,
                 chunk_elements: int | None = None, heads: dict[int, tuple[int, ...]] | None = None) -> None:
        if key_positions.dim() != 3:
            raise ValueError(f"key_positions must be (B, O, S), got shape {tuple(key_positions.shape)}")
        if heads is not None:
            heads = {int(layer): tuple(sorted(set(int(h) for h in chosen)))
                     for layer, chosen in heads.items() if chosen}
            layers = list(heads)
        if not layers:
            raise ValueError("layers is empty; use ospo_fast.ops.object_masks.select_layers(num_layers)")
        if num_cells < 1:
            raise ValueError(f"num_cells={num_cells} must be >= 1 (grid * grid)")
        self.layers = sorted(set(int(i) for i in layers))
        self.heads = heads  # None: every head of each layer
        self._expected = len(self.layers) if heads is None else sum(len(h) for h in heads.values())
        self.num_cells = int(num_cells)
        device = key_positions.device
        self.chunk_elements = int(chunk_elements or capture_chunk_elements(device))
        b, o, s = key_positions.shape
        self.key_positions = torch.full((b, o, s), -1, dtype=torch.long, device=device)
        self._gather = torch.zeros(b, 1, 1, o * s, dtype=torch.long, device=device)  # (B, 1, 1, O*S)
        self._sums = torch.zeros(b, o * s, self.num_cells, device=device)  # (B, O*S, N) float32, over heads, layers
        self._heads = torch.ones((), dtype=torch.long, device=device)  # heads of the recorded layers
        self._counts = torch.zeros(self.num_cells, device=device)  # (N,) layers recorded per cell
        self._start: int | torch.Tensor | None = None
        self._stage: torch.Tensor | None = None  # Jacobi: (B, O*S, W+1) columns of one forward, before commit
        self._recording = False
        self.stop_after_last_layer = False  # a teacher-forced pass needs no layer after the last selected one
        self.load(key_positions)

    def load(self, key_positions: torch.Tensor) -> None:
        """Start over with new key positions of the same shape, in place (tensor addresses are kept, so a
        CUDA graph recorded over this capture replays for the next batch)."""
        if key_positions.shape != self.key_positions.shape:
            raise ValueError(f"key_positions has shape {tuple(key_positions.shape)}, this capture was built for "
                             f"{tuple(self.key_positions.shape)}; build a new capture")
        self._max_position = int(key_positions.max()) if key_positions.numel() else -1
        positions = key_positions.to(self.key_positions.device, torch.long)
        self.key_positions.copy_(positions)
        self._gather.copy_(positions.clamp(min=0).view(self._gather.shape))
        self._sums.zero_()
        self._counts.zero_()
        if self._stage is not None:
            self._stage.zero_()

    def tensors(self) -> list[torch.Tensor]:
        """The state tensors (to mark as static addresses for CUDA graphs)."""
        staged = [] if self._stage is None else [self._stage]
        return [self.key_positions, self._gather, self._sums, self._counts, self._heads, *staged]

    # -- staged commits (Jacobi decoding) -----------------------------------------------------------------------
    def stage_window(self, width: int) -> None:
        """From now on a forward's ``width`` queries (cells start .. start + width - 1) are added to a staging block
        instead of the accumulators; ``commit_stage`` then keeps only the (row, cell) entries that are exact. For a
        decoder whose forwards feed guesses (Jacobi iteration): a query is kept once, from the first forward in
        which its whole prefix was exact."""
        self._stage = torch.zeros(self.batch_size, self._sums.shape[1], width, device=self._sums.device)

    def commit_stage(self, cells: torch.Tensor, keep: torch.Tensor) -> None:
        """Add the staged columns whose ``keep`` (B, width) bool is set to cells ``cells`` (width,) long (cells past
        the grid are dropped), then clear the stage. Device-only."""
        inside = (cells < self.num_cells)[None, :] & keep  # (B, width)
        self._sums.index_add_(2, cells.clamp(max=self.num_cells - 1), self._stage * inside[:, None, :].float())
        self._stage.zero_()

    def finish_staged(self) -> None:
        """After every (row, cell) was committed exactly once (the decoder's account): each cell has the selected
        layers' (or pairs') full count, as a step-by-step capture would have."""
        self._counts.fill_(float(self._expected))

    @property
    def batch_size(self) -> int:
        return self.key_positions.shape[0]

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module) -> Iterator[ObjectAttentionCapture]:
        """Run ``model``'s language model with the engine's attention (``engine.attention``, restored on exit);
        forwards inside capture only when passed ``object_capture=self``. A capture records in one block at a time."""
        if self._recording:
            raise RuntimeError("this ObjectAttentionCapture is already recording; nest none")
        self._recording = True
        try:
            with engine_attention_on(model):
                yield self
        finally:
            self._recording = False

    def set_cells(self, start: int | torch.Tensor | None) -> None:
        """Queries of the next forward are cells start, start+1, ...; None stops capturing. A 0-d tensor is kept
        by reference: advancing it in place moves the cells of later forwards."""
        self._start = start if start is None or isinstance(start, torch.Tensor) else int(start)

    def captured_cells(self) -> torch.Tensor:
        """(num_cells,) bool: cells that received at least one layer's attention."""
        return self._counts > 0

    def maps(self) -> torch.Tensor:
        """(B, O, num_cells) float32 on the recording device: mean over the selected layers, heads and sub-tokens.
        Cells never captured are NaN (object_masks then raises naming the image): a missed step cannot pass
        silently; a cell recorded more than once per layer (a forward repeated without ``set_cells``) raises."""
        if bool((self._counts > self._expected).any()):
            cell = int((self._counts > self._expected).nonzero()[0])
            raise RuntimeError(f"cell {cell} was recorded {int(self._counts[cell])} times by {len(self.layers)} "
                               "layers; call capture.set_cells(start) before every forward")
        scores = self.scores((self.num_cells, 1))
        maps = maps_from_scores_ref(scores, scores.token_valid.any(-1))  # (B, O, N, 1) float64; padded objects 0
        return torch.where(self._counts > 0, maps[..., 0].float(), float("nan"))

    def scores(self, grid: tuple[int, int]) -> CapturedScores:
        """The accumulators as the fused mask op reads them: sums (B, O, S, G1, G2) float32 over heads and layers,
        counts (B, G1, G2), heads, token_valid (B, O, S); grid: (G1, G2) with G1 * G2 = num_cells. Views, not
        copies (one host read: the head count)."""
        b, o, s = self.key_positions.shape
        g1, g2 = grid
        if g1 * g2 != self.num_cells:
            raise ValueError(f"grid {grid} has {g1 * g2} cells, this capture has {self.num_cells}")
        return CapturedScores(sums=self._sums.view(b, o, s, g1, g2),
                              counts=self._counts.view(1, g1, g2).expand(b, g1, g2), heads=int(self._heads),
                              token_valid=self.key_positions >= 0)

    # -- recording ------------------------------------------------------------------------------------------------
    def wants(self, layer: int) -> bool:
        """True when a forward of ``layer`` now should be recorded (cells set, layer selected)."""
        return self._start is not None and layer in self.layers

    def key_slots(self) -> torch.Tensor:
        """(B, O*S) long: the object keys' cache slots, padding clamped to slot 0 (weighted 0 in ``maps``)."""
        return self._gather.view(self.batch_size, -1)

    def record_probabilities(self, layer: int, probs: torch.Tensor) -> None:
        """A decode step's probabilities of the object keys, from the decode attention's own log-sum-exp:
        probs (B, H, O*S) float32 for the one query per row, whose cell is the device counter's (or the int's)."""
        if not self.wants(layer):
            return
        weights, count = self._selection(layer, probs.shape[1], probs.device)
        self._heads.fill_(probs.shape[1] if weights is None else 1)
        picked = probs if weights is None else probs * weights[None, :, None]
        self._accumulate(picked.sum(dim=1)[:, :, None], count)  # (B, O*S, 1)

    def _selection(self, layer: int, num_heads: int, device) -> tuple[torch.Tensor | None, float]:
        """(head weights (H,) of 0/1 or None for every head, what one query of this layer adds to its cell's count:
        1 layer, or the number of selected pairs when heads are selected)."""
        if self.heads is None:
            return None, 1.0
        chosen = self.heads[layer]
        if chosen[-1] >= num_heads:
            raise ValueError(f"head {chosen[-1]} of layer {layer} is selected but the layer has {num_heads} heads")
        weights = torch.zeros(num_heads, device=device)
        weights[list(chosen)] = 1.0
        return weights, float(len(chosen))

    def _record(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                scaling: float, lse: torch.Tensor | None = None) -> None:
        """Record the selected layer's queries (B', H, Tq, D) against keys (B', Hkv, Tk, D) under ``mask`` (as SDPA
        receives it); lse (B', H, Tq) float32: the attention's own log-sum-exp, or None to compute it here."""
        if not self.wants(layer):
            return
        b, tq = self.batch_size, query.shape[2]
        if query.shape[0] < b:
            raise ValueError(f"the forward has {query.shape[0]} rows but the capture expects at least {b} images")
        weights, count = self._selection(layer, query.shape[1], query.device)
        self._heads.fill_(query.shape[1] if weights is None else 1)  # a tensor: the compiled step keeps no state
        if isinstance(self._start, int) and self._stage is None:  # cells known on the host: only those queries
            q0, q1 = max(0, -self._start), min(tq, self.num_cells - self._start)
            if q0 >= q1:
                return
            self._check_keys(key.shape[2])
            columns = self._object_columns(query[:b], key[:b], mask, scaling, q0, q1, lse, weights)  # (B, O*S, C)
            cells = slice(self._start + q0, self._start + q1)
            self._sums[:, :, cells] += columns
            self._counts[cells] += count
            return
        self._accumulate(self._object_columns(query[:b], key[:b], mask, scaling, 0, tq, lse, weights), count)

    def _accumulate(self, columns: torch.Tensor, count: float = 1.0) -> None:
        """Add columns (B, O*S, Tq) for the queries at cells start, start+1, ...; cells outside the grid weigh 0
        (device counter: fixed-shape work, no host read)."""
        tq = columns.shape[2]
        if self._stage is not None:  # Jacobi: staged until the decoder knows which queries were exact
            self._stage += columns
            return
        if isinstance(self._start, int):
            cells = torch.arange(self._start, self._start + tq, device=columns.device)
        else:
            cells = self._start + torch.arange(tq, device=columns.device)  # (Tq,)
        inside = ((cells >= 0) & (cells < self.num_cells)).float()  # (Tq,)
        index = cells.clamp(0, self.num_cells - 1)
        self._sums.index_add_(2, index, columns * inside)
        self._counts.index_add_(0, index, inside * count)

    def _check_keys(self, tk: int) -> None:
        if self._max_position >= tk:
            raise ValueError(f"key position {self._max_position} is beyond the {tk} keys of this forward; "
                             "key_positions must index the KV sequence (cache slots)")

    def _object_columns(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                        q0: int, q1: int, lse: torch.Tensor | None = None,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
        """Queries q0:q1 of (B, H, Tq, D) against keys (B, Hkv, Tk, D) -> (B, O*S, q1 - q0) float32 sums over
        heads of each sub-token key's probability. With ``lse`` (B', H, Tq) only the object keys are scored;
        without, the logsumexp over all Tk keys is computed here, chunk by chunk."""
        b, h, tq, d = query.shape
        hkv, tk = key.shape[1], key.shape[2]
        groups = h // hkv
        o, s = self.key_positions.shape[1:]
        gather_idx = self._gather  # (B, 1, 1, O*S)
        if lse is not None:
            picked = key.gather(2, gather_idx.view(b, 1, o * s, 1).expand(b, hkv, o * s, d))  # (B, Hkv, O*S, D)
            picked = picked.float().repeat_interleave(groups, dim=1).transpose(-1, -2)  # (B, H, D, O*S)
        else:
            k = key.float()
        chunk = max(1, self.chunk_elements // max(1, b * h * (o * s if lse is not None else tk)))
        out = []
        for c0 in range(q0, q1, chunk):
            c1 = min(q1, c0 + chunk)
            if lse is not None:
                scores = torch.matmul(query[:, :, c0:c1].float(), picked) * scaling  # (B, H, C, O*S)
                visible = self._additive_mask(mask, b, tq, tk, c0, c1, query.device)  # (B|1, 1, C|1, Tk)
                visible = visible.expand(b, 1, c1 - c0, tk).gather(-1, gather_idx.expand(b, 1, c1 - c0, o * s))
                probs = torch.exp(scores + visible - lse[:b, :, c0:c1, None])
            else:
                q = query[:, :, c0:c1].float().reshape(b, hkv, groups * (c1 - c0), d)  # (B, Hkv, g*C, D)
                scores = torch.matmul(q, k.transpose(-1, -2)).view(b, h, c1 - c0, tk) * scaling  # (B, H, C, Tk)
                scores = scores + self._additive_mask(mask, b, tq, tk, c0, c1, query.device)
                chunk_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, C, 1)
                picked_scores = scores.gather(-1, gather_idx.expand(b, h, c1 - c0, o * s))  # (B, H, C, O*S)
                probs = torch.exp(picked_scores - chunk_lse)
            if weights is not None:  # selected heads only
                probs = probs * weights.view(1, -1, 1, 1)
            out.append(probs.sum(dim=1).transpose(1, 2))  # (B, O*S, C)
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
def teacher_forced_inputs(bundle, prompts: list[str], image_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embeddings of [prompt + <begin_of_image>] + image tokens: inputs_embeds (B, T+N, D), attention_mask,
    position_ids (left padding aware), and input_ids (B, T) of the text part."""
    model = bundle.model
    device = bundle.device
    ids, attn = image_prompt_inputs(bundle.processor, prompts)
    ids, attn = ids.to(device), attn.to(device)
    lm = model.model.language_model
    image_tokens = image_tokens.to(device)
    embeds = torch.cat([lm.get_input_embeddings()(ids),
                        model.prepare_embeddings_for_image_generation(image_tokens)], dim=1)  # (B, T+N, D)
    attn = torch.cat([attn, torch.ones_like(image_tokens)], dim=1)  # (B, T+N)
    return {"inputs_embeds": embeds, "attention_mask": attn, "position_ids": position_ids_from_mask(attn),
            "input_ids": ids}


@torch.no_grad()
def teacher_forced_object_maps(bundle, prompts: list[str], image_tokens: torch.Tensor, objects: list[list[str]],
                               skip_layers: int = 5, layers: list[int] | None = None,
                               heads: dict[int, tuple[int, ...]] | None = None) -> torch.Tensor:
    """Object-attention maps from one batched teacher-forced forward (SPEC stage 3, context ``base``).

    prompts: B prompt strings; image_tokens: (B, N) long VQ tokens (N = G*G); objects: B lists of object words;
    layers: the layers to average (default ``select_layers(num_layers, skip_layers)``; e.g. one layer to see where
    each layer looks); heads: {layer: head indices} to average instead (localisation heads). Cell j is the query
    whose input is image token j. Returns (B, O, G, G) float32 (padded objects: zeros).
    """
    capture = _teacher_forced_capture(bundle, prompts, image_tokens, objects, skip_layers, layers, heads)
    grid = int(round(capture.num_cells ** 0.5))
    return capture.maps().view(len(prompts), -1, grid, grid)


@torch.no_grad()
def teacher_forced_object_scores(bundle, prompts: list[str], image_tokens: torch.Tensor, objects: list[list[str]],
                                 skip_layers: int = 5,
                                 heads: dict[int, tuple[int, ...]] | None = None) -> CapturedScores:
    """As ``teacher_forced_object_maps``, but the capture's accumulators (sums (B, O, S, G, G) over heads and
    layers, counts, heads, token_valid) for ``ospo_fast.ops.object_masks.object_masks_from_scores``."""
    capture = _teacher_forced_capture(bundle, prompts, image_tokens, objects, skip_layers, heads=heads)
    grid = int(round(capture.num_cells ** 0.5))
    return capture.scores((grid, grid))


def _teacher_forced_capture(bundle, prompts: list[str], image_tokens: torch.Tensor, objects: list[list[str]],
                            skip_layers: int, layers: list[int] | None = None,
                            heads: dict[int, tuple[int, ...]] | None = None) -> ObjectAttentionCapture:
    """The capture after one batched teacher-forced forward of [prompt + <begin_of_image>] + image tokens."""
    if image_tokens.dim() != 2 or image_tokens.shape[0] != len(prompts) or len(objects) != len(prompts):
        raise ValueError(f"need image_tokens (B, N) and B prompts and object lists; got {tuple(image_tokens.shape)}, "
                         f"{len(prompts)} prompts, {len(objects)} object lists")
    n = image_tokens.shape[1]
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"image_tokens has {n} tokens per image, not a square grid")
    inputs = teacher_forced_inputs(bundle, prompts, image_tokens)
    positions = object_token_positions(bundle.tokenizer, inputs["input_ids"].cpu(), objects).to(bundle.device)
    t = inputs["input_ids"].shape[1]
    if layers is not None and not all(0 <= i < bundle.num_layers for i in layers):
        raise ValueError(f"layers {layers} outside 0..{bundle.num_layers - 1} (the model has {bundle.num_layers})")
    layers = select_layers(bundle.num_layers, skip_layers) if layers is None else layers
    capture = ObjectAttentionCapture(positions, layers, num_cells=n, heads=heads)
    capture.stop_after_last_layer = True  # the layers after the last selected one change no captured value
    with capture.recording(bundle.model):
        capture.set_cells(-t)  # query t + j has image token j as input
        try:
            bundle.model.model.language_model(inputs_embeds=inputs["inputs_embeds"],
                                              attention_mask=inputs["attention_mask"],
                                              position_ids=inputs["position_ids"], use_cache=False,
                                              object_capture=capture)
        except ForwardStopped:
            pass  # raised by the engine's attention after the last selected layer recorded
    return capture


@torch.no_grad()
def encode_pixels_to_tokens(bundle, pixels: torch.Tensor) -> torch.Tensor:
    """Reference-style path: re-encode images (as saved PNGs) to VQ tokens.

    pixels: (B, H, W, 3) uint8 (as read from PNG) with H = W = grid * the VQ's downsampling (16 for Janus-Pro:
    384 px; 8 for the toy model: 64 px). Returns (B, grid * grid) long tokens.
    """
    if pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be (B, H, W, 3) uint8, got shape {tuple(pixels.shape)}")
    vq_config = bundle.model.config.vq_config
    side = bundle.grid * 2 ** (len(vq_config.channel_multiplier) - 1)  # each multiplier after the first halves
    if pixels.shape[1] != side or pixels.shape[2] != side:
        raise ValueError(f"pixels are {pixels.shape[1]}x{pixels.shape[2]}, the VQ encoder of this model needs "
                         f"{side}x{side}; resize the image first")
    vq = bundle.model.model.vqmodel
    dtype = next(vq.parameters()).dtype
    x = pixels.to(bundle.device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    tokens = vq.encode(x).image_tokens  # (B * grid * grid,)
    return tokens.view(pixels.shape[0], -1)
