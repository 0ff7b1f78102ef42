"""Exact Jacobi decoding (``images.decoding: jacobi``) against the engine's sequential decoding: the same tokens on
the shipped toy model and on odd random shapes (GQA, MQA, ragged prompts, odd layer counts), fewer forwards, one
compiled graph; near-tie flips counted."""

import dataclasses

import pytest
import torch

from ospo_fast.config import ImageConfig
from ospo_fast.engine.image_gen import generate_images
from tests.test_decode_attention import OBJECTS, PROMPTS, _variant

TOY_PROMPTS = ["a red circle to the left of a blue square", "a green triangle above a yellow circle",
               "a cyan square", "a blue circle below a red triangle"]


@pytest.fixture(scope="module")
def tiny():
    from ospo_fast.models import load_janus

    return load_janus("builtin:tiny-4", device="cpu")


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_jacobi_draws_the_toy_models_images_in_fewer_forwards(toy, guidance):
    """The demo's model and settings: identical tokens for every window, no near-tie flip in float32, and at
    least 1.8x fewer forwards than sequential at W = 16 (the default)."""
    seeds = list(range(len(TOY_PROMPTS)))
    sequential = generate_images(toy, TOY_PROMPTS, seeds, ImageConfig(guidance_scale=guidance, compile=False))
    for window in (3, 16):
        config = ImageConfig(guidance_scale=guidance, compile=False, decoding="jacobi", jacobi_window=window)
        jacobi = generate_images(toy, TOY_PROMPTS, seeds, config)
        assert torch.equal(jacobi.tokens, sequential.tokens), window
        assert jacobi.near_tie_flips == 0
        assert jacobi.forward_passes < sequential.forward_passes
    assert sequential.forward_passes / jacobi.forward_passes >= 1.8


@pytest.mark.parametrize("variant", [dict(num_key_value_heads=2, num_hidden_layers=7),
                                     dict(num_key_value_heads=1, num_hidden_layers=5)], ids=["gqa-7", "mqa-5"])
@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["seeded", "greedy"])
def test_jacobi_equals_sequential_on_odd_shapes(tiny, variant, temperature):
    """Ragged prompts (left padding), rows that converge at different speeds (a batch of 3 and a ragged last batch
    of 1 padded to the decoder's rows), GQA and MQA, odd layer counts."""
    model = _variant(tiny, "tiny-4-jacobi", **variant)
    prompts, seeds = PROMPTS + PROMPTS[:1], [5, 6, 7, 8]
    base = ImageConfig(temperature=temperature, top_k=7 if temperature else 0, compile=False, batch_size=3)
    sequential = generate_images(model, prompts, seeds, base)
    jacobi = generate_images(model, prompts, seeds, dataclasses.replace(base, decoding="jacobi", jacobi_window=5))
    assert torch.equal(jacobi.tokens, sequential.tokens)
    assert jacobi.near_tie_flips == 0
    assert jacobi.forward_passes <= sequential.forward_passes


@pytest.mark.parametrize("capture", [False, True], ids=["tokens", "with-capture"])
def test_jacobi_step_is_one_graph_without_breaks(tiny, capture):
    from ospo_fast.engine.attention import engine_attention_on
    from ospo_fast.engine.image_gen import _POOL, _decode_step, _Sampling, _Shape

    captured = dict(objects=4, subtokens=4, layers=(1, 2)) if capture else {}
    shape = _Shape(2, 64, tiny.num_image_tokens, _Sampling(5.0, 1.0, 0, 1.0), window=4, **captured)
    decoder = _POOL.get(tiny.model, shape, torch.device("cpu"))
    ids = torch.ones(4, 64, dtype=torch.int64)
    positions = torch.full((2, 4, 4), -1, dtype=torch.int64)
    positions[:, 0, 0] = 5
    with torch.no_grad(), engine_attention_on(tiny.model):
        decoder.start(ids, torch.ones(4, 64, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                      positions if capture else None)
        explained = torch._dynamo.explain(_decode_step)(decoder)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert int(decoder.accepted.min()) >= 2  # at least one token gained per row


@pytest.mark.slow  # one inductor compile of the Jacobi step: about 40 s on 2 idle cores
def test_compiled_jacobi_equals_eager(tiny):
    from torch._dynamo.utils import counters

    config = ImageConfig(temperature=1.0, compile=False, decoding="jacobi", jacobi_window=4, batch_size=2)
    eager = generate_images(tiny, PROMPTS, [1, 2, 3], config)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate_images(tiny, PROMPTS, [1, 2, 3], dataclasses.replace(config, compile=True))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert torch.equal(compiled.tokens, eager.tokens)


@pytest.mark.parametrize("variant", [dict(num_key_value_heads=2, num_hidden_layers=7),
                                     dict(num_key_value_heads=1, num_hidden_layers=5)], ids=["gqa-7", "mqa-5"])
@pytest.mark.parametrize("window", [2, 5, 40])
def test_jacobi_captures_the_same_object_maps_in_flight(tiny, variant, window):
    """Was refused. The in-flight capture under Jacobi iteration keeps each (row, cell) from the first forward in
    which its query saw exact inputs only: the same maps as sequential decoding's capture (up to the rounding of
    a multi-token forward), for every layer and for selected heads, ragged prompts and rows that converge at
    different speeds; at most one forward more than the tokens alone need."""
    model = _variant(tiny, "tiny-4-jacobi", **variant)
    prompts, seeds, objects = PROMPTS + PROMPTS[:1], [5, 6, 7, 8], OBJECTS + OBJECTS[:1]
    layers = list(range(1, model.num_layers - 1))
    base = ImageConfig(temperature=1.0, top_k=7, compile=False, batch_size=3)
    jacobi_config = dataclasses.replace(base, decoding="jacobi", jacobi_window=window)
    for heads in (None, {layers[0]: (0,), layers[-1]: (0, 1)}):
        sequential = generate_images(model, prompts, seeds, base, objects=objects, mask_layers=layers,
                                     mask_heads=heads)
        jacobi = generate_images(model, prompts, seeds, jacobi_config, objects=objects, mask_layers=layers,
                                 mask_heads=heads)
        tokens_only = generate_images(model, prompts, seeds, jacobi_config)
        assert torch.equal(jacobi.tokens, sequential.tokens)
        assert not torch.isnan(jacobi.object_maps).any()
        torch.testing.assert_close(jacobi.object_maps, sequential.object_maps, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(jacobi.object_scores.counts, sequential.object_scores.counts)
        batches = 2  # 4 prompts in batches of 3
        assert tokens_only.forward_passes <= jacobi.forward_passes <= tokens_only.forward_passes + batches
