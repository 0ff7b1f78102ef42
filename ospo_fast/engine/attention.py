"""The engine's attention: one implementation registered with transformers (``AttentionInterface``), so Janus's own
modules run it without any patching of library code.

- A decode step of the image engine (one query per row, ``decode_slots=DecodeSlots(...)`` passed to the language
  model's forward, which transformers hands on to attention) goes to ``ospo_fast.ops.decode_attention``: each row
  reads only its filled cache slots, and with ``object_capture=`` the selected layers hand the capture the
  probabilities of the object keys computed from that kernel's own log-sum-exp.
- Everything else (prefill, teacher-forced passes, a decode without ``decode_slots``) is transformers' SDPA with
  the mask transformers builds for SDPA. With ``object_capture=``, a selected layer runs the same SDPA kernel
  through the aten op that also returns its log-sum-exp (``attention_with_lse``: CPU flash attention, CUDA
  memory-efficient attention) and hands the lse to the capture, which then scores only the object keys; a
  capture with ``stop_after_last_layer`` ends the forward after its last layer (``ForwardStopped``).

``engine_attention_on(model)`` switches a model's language model to this implementation and back; it nests (an
inner switch of a model already switched does nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ospo_fast.ops.decode_attention import attention_with_lse, decode_attention

ATTENTION_NAME = "ospo_engine"


class ForwardStopped(Exception):
    """Raised by the engine's attention after a capture's last selected layer when the capture asked for it
    (``stop_after_last_layer``): a teacher-forced mask pass needs no later layer. Caught by that pass."""


@dataclass
class DecodeSlots:
    """Where each row's real keys are in a static cache of a decode step: start, end (rows,) int32 device tensors,
    slots [start, end) (left padding before, unwritten slots after); backend: the decode attention's
    (``ospo_fast.ops.decode_attention.BACKENDS``)."""

    start: torch.Tensor
    end: torch.Tensor
    backend: str = "auto"


def engine_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     object_capture=None, decode_slots: DecodeSlots | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, Tq, D) post-RoPE, key/value (B, Hkv, Tk, D) (the cache after this step's update) ->
    (B, Tq, H, D), as transformers' attention functions return it."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if decode_slots is not None and query.shape[2] == 1:
        capture = object_capture if object_capture is not None and object_capture.wants(module.layer_idx) else None
        out, _, probs = decode_attention(
            query[:, :, 0], key, value, decode_slots.start, decode_slots.end, scale,
            slots=None if capture is None else capture.key_slots(),
            capture_rows=0 if capture is None else capture.batch_size, backend=decode_slots.backend)
        if capture is not None:
            capture.record_probabilities(module.layer_idx, probs)  # (R, H, O*S)
        return out[:, None], None  # (B, 1, H, D)
    if object_capture is not None and object_capture.wants(module.layer_idx):
        out, lse = attention_with_lse(query, key, value, attention_mask, scale)  # (B, H, Tq, D), (B, H, Tq)
        object_capture._record(module.layer_idx, query, key, attention_mask, scale, lse=lse)
        if object_capture.stop_after_last_layer and module.layer_idx == object_capture.layers[-1]:
            raise ForwardStopped(module.layer_idx)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder whose attention is switched: JanusForConditionalGeneration, JanusModel or the LM itself."""
    for path in ("model.language_model", "language_model"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None:
            return obj
    if hasattr(model, "layers") and hasattr(model, "config"):
        return model
    raise ValueError(f"cannot find a language model in {type(model).__name__}; pass a Janus model or its decoder")


@contextlib.contextmanager
def engine_attention_on(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s language model with ``engine_attention`` inside the block; the original implementation is
    restored on exit (also on error). Nested switches of the same model do nothing."""
    lm = _language_model(model)
    original = lm.config._attn_implementation
    if original == ATTENTION_NAME:
        yield
        return
    AttentionInterface.register(ATTENTION_NAME, engine_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # masks exactly as SDPA receives them
    lm.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        lm.set_attn_implementation(original)
