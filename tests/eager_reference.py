"""The reference code's way to object-attention maps, shared by the tests that compare against it: transformers'
eager forward with ``output_attentions=True``, mean over heads, the selected layers and each object's sub-tokens,
for the queries whose input is image token j."""

import torch

from ospo_fast.ops.object_masks import select_layers


def eager_object_maps(bundle, batch: dict, positions: torch.Tensor, layers: list[int] | None = None,
                      heads: dict[int, list[int]] | None = None) -> torch.Tensor:
    """batch: ``teacher_forced_inputs`` (prompt + image tokens); positions (B, O, S) key positions, -1 = padding;
    layers: default ``select_layers(num_layers)``; heads: {layer: heads} to average instead (the mean over those
    (layer, head) pairs) -> maps (B, O, G, G) float32 (zeros for padded objects). The model's attention
    implementation is restored."""
    lm = bundle.model.model.language_model
    original = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], output_attentions=True, use_cache=False)
    finally:
        lm.set_attn_implementation(original)
    t = batch["input_ids"].shape[1]
    if heads is not None:
        pairs = [out.attentions[layer][:, head, t:, :] for layer, chosen in heads.items() for head in chosen]
        attn = torch.stack(pairs).mean(dim=0)  # (B, N, Tk): the mean over the (layer, head) pairs
    else:
        layers = select_layers(bundle.num_layers) if layers is None else layers
        attn = torch.stack([out.attentions[i] for i in layers])  # (L, B, H, T, T)
        attn = attn[:, :, :, t:, :].mean(dim=2).mean(dim=0)  # (B, N, Tk)
    maps = torch.zeros(*positions.shape[:2], attn.shape[1])
    for b in range(positions.shape[0]):
        for o in range(positions.shape[1]):
            keys = positions[b, o][positions[b, o] >= 0]
            if len(keys):
                maps[b, o] = attn[b][:, keys].mean(dim=-1)
    return maps.view(*positions.shape[:2], bundle.grid, bundle.grid)
