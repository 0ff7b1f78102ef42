"""Object-attention capture against transformers' own eager ``output_attentions=True`` forward of the same model."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from ospo_fast.engine.attention import ATTENTION_NAME
from ospo_fast.engine.object_attention import (
    CPU_CHUNK_ELEMENTS,
    CUDA_CHUNK_ELEMENTS,
    ObjectAttentionCapture,
    capture_chunk_elements,
    encode_pixels_to_tokens,
    object_token_positions,
    objects_valid,
    teacher_forced_inputs,
    teacher_forced_object_maps,
)
from ospo_fast.ops.object_masks import object_masks_ref, select_layers
from tests.eager_reference import eager_object_maps

PROMPTS = ["a red car and a blue bench near a tree", "a dog", "two cats beside a lamp"]
OBJECTS = [["car", "bench", "tree"], ["dog"], ["cats", "lamp"]]
STEPS = 10  # cells decoded one query per forward in the step-by-step test


@pytest.fixture(scope="module")
def inputs(tiny_bundle):
    tokens = torch.randint(0, tiny_bundle.model.config.vq_config.num_embeddings, (len(PROMPTS), 64),
                           generator=torch.Generator().manual_seed(0))
    batch = teacher_forced_inputs(tiny_bundle, PROMPTS, tokens)
    positions = object_token_positions(tiny_bundle.tokenizer, batch["input_ids"], OBJECTS)
    return tokens, batch, positions


@pytest.fixture(scope="module")
def eager_maps(tiny_bundle, inputs):
    _, batch, positions = inputs
    return eager_object_maps(tiny_bundle, batch, positions)


def _assert_same_masks(maps, oracle, valid):
    torch.testing.assert_close(maps, oracle, atol=1e-6, rtol=1e-5)
    ours, ref = object_masks_ref(maps, object_valid=valid), object_masks_ref(oracle, object_valid=valid)
    assert torch.equal(ours.masks, ref.masks) and torch.equal(ours.union, ref.union)


def test_teacher_forced_maps_equal_eager_attentions(tiny_bundle, inputs, eager_maps):
    tokens = inputs[0]
    maps = teacher_forced_object_maps(tiny_bundle, PROMPTS, tokens, OBJECTS)
    assert maps.shape == (3, 3, 8, 8) and maps.dtype == torch.float32
    _assert_same_masks(maps, eager_maps, objects_valid(OBJECTS))
    assert tiny_bundle.model.model.language_model.config._attn_implementation == "sdpa"


def test_teacher_forced_maps_of_chosen_heads_equal_eager_attentions(tiny_bundle, inputs):
    """Localisation heads: the capture averages only the chosen (layer, head) pairs, as eager output_attentions
    averaged over those pairs; the fused mask op reads the same means from the scores."""
    from ospo_fast.engine.object_attention import teacher_forced_object_scores
    from ospo_fast.ops.object_masks import maps_from_scores_ref

    tokens, batch, positions = inputs
    heads = {2: (1,), 4: (0, 3), 7: (2,)}
    maps = teacher_forced_object_maps(tiny_bundle, PROMPTS, tokens, OBJECTS, heads=heads)
    _assert_same_masks(maps, eager_object_maps(tiny_bundle, batch, positions, heads=heads), objects_valid(OBJECTS))
    scores = teacher_forced_object_scores(tiny_bundle, PROMPTS, tokens, OBJECTS, heads=heads)
    assert scores.heads == 1 and float(scores.counts.max()) == 4  # four (layer, head) pairs per cell
    torch.testing.assert_close(maps_from_scores_ref(scores, objects_valid(OBJECTS)).float(), maps, atol=1e-6,
                               rtol=1e-5)


def test_teacher_forced_pass_stops_after_the_last_selected_layer(tiny_bundle, inputs):
    """The mask pass runs the layers up to the last selected one and no further (their output changes no map)."""
    tokens = inputs[0]
    layers = tiny_bundle.model.model.language_model.layers
    ran = []
    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        teacher_forced_object_maps(tiny_bundle, PROMPTS, tokens, OBJECTS, layers=[1, 3])
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0, 1, 2, 3] and len(layers) > 4
    assert tiny_bundle.model.model.language_model.config._attn_implementation == "sdpa"  # restored after the stop


def test_teacher_forced_maps_of_chosen_layers_equal_eager_attentions(tiny_bundle, inputs):
    """``layers=[i]``: one layer's maps (what recipes/toy_janus/probes/toy_mask_probe.py reads per layer) equal
    eager's; a layer the model does not have is an error naming the range."""
    tokens, batch, positions = inputs
    for layers in ([0], [tiny_bundle.num_layers - 1], [1, 3]):
        maps = teacher_forced_object_maps(tiny_bundle, PROMPTS, tokens, OBJECTS, layers=layers)
        _assert_same_masks(maps, eager_object_maps(tiny_bundle, batch, positions, layers), objects_valid(OBJECTS))
    with pytest.raises(ValueError, match="outside 0.."):
        teacher_forced_object_maps(tiny_bundle, PROMPTS, tokens, OBJECTS, layers=[tiny_bundle.num_layers])


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_step_by_step_capture_with_cache_and_cfg(tiny_bundle, inputs, eager_maps, cache_kind):
    """Prefill the text, then one image token per forward for the first cells and the rest in one chunk, with
    unconditional CFG rows appended (not captured)."""
    _, batch, positions = inputs
    lm = tiny_bundle.model.model.language_model
    t, n = batch["input_ids"].shape[1], 64
    embeds = torch.cat([batch["inputs_embeds"], batch["inputs_embeds"].flip(0)])  # (2B, T+N, D)
    mask = torch.cat([batch["attention_mask"], batch["attention_mask"].flip(0)])
    pos_ids = torch.cat([batch["position_ids"], batch["position_ids"].flip(0)])
    if cache_kind == "dynamic":
        cache = DynamicCache(config=lm.config)
    else:
        cache = StaticCache(config=lm.config, max_cache_len=t + n + 7)
    capture = ObjectAttentionCapture(positions, select_layers(tiny_bundle.num_layers), num_cells=n)
    with torch.no_grad(), capture.recording(tiny_bundle.model):
        capture.set_cells(-t)
        lm(inputs_embeds=embeds[:, :t], attention_mask=mask[:, :t], position_ids=pos_ids[:, :t],
           past_key_values=cache, use_cache=True, object_capture=capture)
        steps = [(j, j + 1) for j in range(STEPS)] + [(STEPS, n)]
        for a, z in steps:
            capture.set_cells(a)
            lm(inputs_embeds=embeds[:, t + a: t + z], attention_mask=mask[:, : t + z],
               position_ids=pos_ids[:, t + a: t + z], past_key_values=cache, use_cache=True, object_capture=capture)
    assert capture.captured_cells().all()
    _assert_same_masks(capture.maps().view(3, 3, 8, 8), eager_maps, objects_valid(OBJECTS))


def test_chunked_logsumexp_is_exact(tiny_bundle, inputs, eager_maps):
    _, batch, positions = inputs
    capture = ObjectAttentionCapture(positions, select_layers(tiny_bundle.num_layers), num_cells=64,
                                     chunk_elements=1)  # one query row per chunk
    t = batch["input_ids"].shape[1]
    with torch.no_grad(), capture.recording(tiny_bundle.model):
        capture.set_cells(-t)
        tiny_bundle.model.model.language_model(inputs_embeds=batch["inputs_embeds"],
                                               attention_mask=batch["attention_mask"],
                                               position_ids=batch["position_ids"], use_cache=False,
                                               object_capture=capture)
    torch.testing.assert_close(capture.maps().view(3, 3, 8, 8), eager_maps, atol=1e-6, rtol=1e-5)


def test_recording_restores_attention_on_error_and_guards_misuse(tiny_bundle, inputs):
    _, batch, positions = inputs
    lm = tiny_bundle.model.model.language_model
    capture = ObjectAttentionCapture(positions, [3, 4], num_cells=64)
    with pytest.raises(RuntimeError, match="boom"), capture.recording(tiny_bundle.model):
        assert lm.config._attn_implementation == ATTENTION_NAME
        raise RuntimeError("boom")
    assert lm.config._attn_implementation == "sdpa"
    short = {k: v[:, :-1] for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad(), capture.recording(tiny_bundle.model):
        with pytest.raises(RuntimeError, match="already recording"), capture.recording(tiny_bundle.model):
            pass
        capture.set_cells(0)
        lm(**short, use_cache=False, object_capture=capture)
        lm(**short, use_cache=False, object_capture=capture)  # same cells again without set_cells
    assert lm.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="set_cells"):
        capture.maps()
    assert torch.isnan(ObjectAttentionCapture(positions, [3], num_cells=4).maps()).all()  # nothing captured


def test_object_token_positions(tiny_bundle):
    tok = tiny_bundle.tokenizer
    prompts = ["a red car and a red Car", "two cats on a bench", "a tree"]
    ids = tok(prompts, padding=True, return_tensors="pt")["input_ids"]
    pos = object_token_positions(tok, ids, [["car", "red"], ["cats", "bench"], ["tree"]])
    assert pos.shape[:2] == (3, 2)
    for b, words in enumerate([["car", "red"], ["cats", "bench"], ["tree"]]):
        for o, word in enumerate(words):
            keys = pos[b, o][pos[b, o] >= 0]
            text = tok.decode(ids[b, keys]).strip()
            assert text.lower() == word, (text, word)
    # repeated word: the first occurrence; left padding shifts positions
    first = tok(["a red car and a red Car"], return_tensors="pt")["input_ids"]
    assert pos[0, 0, 0] == object_token_positions(tok, first, [["car"]])[0, 0, 0]
    assert pos[0, 0, 0] < pos[0, 1, 0] + 3
    assert (pos[2, 1] == -1).all()
    with pytest.raises(ValueError, match="'horse'.*a tree"):
        object_token_positions(tok, ids[2:], [["horse"]])
    with pytest.raises(ValueError, match="'ca'"):  # no partial-word matches
        object_token_positions(tok, ids[:1], [["ca"]])


def test_encode_pixels_to_tokens(tiny_bundle):
    pixels = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = encode_pixels_to_tokens(tiny_bundle, pixels)
    assert tokens.shape == (2, 64) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < tiny_bundle.model.config.vq_config.num_embeddings
    with pytest.raises(ValueError, match="128x128"):
        encode_pixels_to_tokens(tiny_bundle, pixels[:, :64, :64])


@pytest.mark.parametrize("with_lse", [False, True], ids=["own-lse", "attention-lse"])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_heads_and_masks(masked, with_lse):
    """GQA (2 query heads per KV head) and left padding against softmax over repeated keys."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, tq, d = 2, 4, 2, 6, 8
    query, key = torch.randn(b, h, tq, d, generator=g), torch.randn(b, hkv, tq, d, generator=g)
    positions = torch.tensor([[[1, 2], [3, -1]], [[2, -1], [4, 5]]])
    visible = torch.ones(tq, tq).tril().bool().expand(b, 1, tq, tq).clone()
    if masked:
        visible[1, :, :, :2] = False  # image 1 is left-padded by two tokens
    capture = ObjectAttentionCapture(positions, [0], num_cells=tq)
    capture.set_cells(0)
    lse = None
    if with_lse:  # what the engine's attention hands over: the SDPA kernel's own log-sum-exp
        from ospo_fast.ops.decode_attention import attention_with_lse

        value = torch.randn(b, hkv, tq, d, generator=g)
        _, lse = attention_with_lse(query, key, value, visible if masked else None, d ** -0.5)
    capture._record(0, query, key, visible if masked else None, scaling=d ** -0.5, lse=lse)
    scores = query @ key.repeat_interleave(h // hkv, dim=1).transpose(-1, -2) * d ** -0.5
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0).mean(1)  # (B, Q, Tk)
    expected = torch.zeros(b, 2, tq)
    for i in range(b):
        for o in range(2):
            keys = positions[i, o][positions[i, o] >= 0]
            expected[i, o] = probs[i][:, keys].mean(-1)
    got = capture.maps()
    if masked:  # padding query rows see no key (and are never image cells): compare the real rows
        got, expected = got[:, :, 2:], expected[:, :, 2:]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_capture_chunks_are_fixed_per_device():
    """Fixed score blocks (never a share of free memory, which the KV cache and graph pools make unpredictable):
    with the attention's own lse a Janus-Pro teacher-forced pass (16 images x 16 heads x 16 object keys x 600
    queries) is one CUDA block per layer."""
    assert capture_chunk_elements("cpu") == CPU_CHUNK_ELEMENTS
    assert capture_chunk_elements("cuda") == CUDA_CHUNK_ELEMENTS >= 16 * 16 * 16 * 600
    positions = torch.zeros(1, 1, 1, dtype=torch.long)
    assert ObjectAttentionCapture(positions, [0], num_cells=4).chunk_elements == CPU_CHUNK_ELEMENTS
