"""The decode attention over filled cache slots (ops/decode_attention.py, kernels/decode_attention.py) against
PyTorch's own SDPA over the whole masked cache, and the image engine built on it against transformers' generate."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ospo_fast._backend import triton_interpret
from ospo_fast.config import ImageConfig
from ospo_fast.engine.image_gen import generate_images, image_prompt_inputs
from ospo_fast.ops.decode_attention import decode_attention, num_splits
from tests.gpu import TRITON, backend_device, requires_cuda, triton_device

BACKENDS = ["ref", "sdpa", TRITON]  # triton: CUDA tensors on a GPU, CPU tensors under TRITON_INTERPRET=1
# (rows, query heads, kv heads, cache slots, head dim): MHA (Janus-Pro), GQA, MQA; odd sizes throughout
SHAPES = [(3, 5, 5, 131, 24), (4, 6, 2, 77, 16), (2, 4, 1, 200, 32)]


def _case(shape, dtype, seed=0):
    b, h, hkv, length, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    start = torch.randint(0, 9, (b,), generator=g, dtype=torch.int32)  # ragged left padding
    end = torch.full((b,), length - 5, dtype=torch.int32)  # the last 5 slots not yet written
    end[-1] = start[-1] + 1  # a row with one real key
    slots = torch.randint(-1, 20, (b, 7), generator=g)  # -1: padding
    return q, k, v, start, end, slots


def _sdpa_oracle(q, k, v, start, end, scale, dtype):
    """transformers' layout: SDPA over the whole static cache with a boolean mask, in ``dtype``; plus the attention
    probabilities from an explicit float64 softmax (what ``output_attentions`` returns)."""
    b, h, d = q.shape
    groups = h // k.shape[1]
    kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    j = torch.arange(k.shape[2])
    visible = (j >= start[:, None].long()) & (j < end[:, None].long())  # (B, L)
    out = F.scaled_dot_product_attention(q[:, :, None].to(dtype), kk.to(dtype), vv.to(dtype),
                                         attn_mask=visible[:, None, None, :], scale=scale)[:, :, 0]
    scores = torch.einsum("bhd,bhld->bhl", q.double(), kk.double()) * scale
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)  # (B, H, L)
    return out, probs


def _exact_lse(q, k, start, end, scale):
    """(B, H) float64 log-sum-exp of the visible scores, from the inputs as they are (rounded to their dtype)."""
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.einsum("bhd,bhld->bhl", q.double(), kk) * scale
    j = torch.arange(k.shape[2])
    visible = (j >= start[:, None].long()) & (j < end[:, None].long())
    return torch.logsumexp(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_over_the_masked_cache(backend, shape, dtype):
    q, k, v, start, end, slots = _case(shape, dtype)
    scale = shape[-1] ** -0.5
    capture_rows = 2
    device = backend_device(backend)
    out, lse, probs = (t.cpu() for t in decode_attention(*(t.to(device) for t in (q, k, v, start, end)), scale,
                                                         slots.to(device), capture_rows, backend=backend))
    exact, exact_probs = _sdpa_oracle(q.double(), k.double(), v.double(), start, end, scale, torch.float64)
    low, _ = _sdpa_oracle(q, k, v, start, end, scale, dtype)  # SDPA's own error in this dtype
    assert out.dtype == dtype and out.shape == q.shape
    own_error = (low.double() - exact).abs().max().item()
    rounding = torch.finfo(dtype).eps * exact.abs().max().item()  # one output rounding (the interpreter truncates)
    assert (out.double() - exact).abs().max().item() <= 2 * own_error + rounding
    index = slots[:capture_rows, None, :].clamp(min=0).expand(-1, shape[1], -1)  # (R, H, S)
    picked = exact_probs[:capture_rows].gather(2, index)
    torch.testing.assert_close(probs.double(), picked, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=1e-4)
    assert lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # bfloat16: the CPU flash kernel scales q in bf16
    torch.testing.assert_close(lse.double(), _exact_lse(q, k, start, end, scale), atol=tol, rtol=tol)


@pytest.mark.skipif(triton_device() is None, reason="triton needs a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 2, 4, 8])
def test_every_key_split_gives_the_same_attention(splits):
    """Split-K over the key axis (flash-decoding): partial softmaxes merged by their log-sum-exps; splits left
    empty by short rows (end - start < splits tiles) write lse = -inf and weigh nothing."""
    from ospo_fast.ops.decode_attention import _decode_attention_triton, decode_attention_ref

    q, k, v, start, end, slots = _case((3, 4, 2, 300, 16), torch.float32, seed=1)
    ref = decode_attention_ref(q, k, v, start, end, 0.25, slots, 3)
    device = triton_device()
    got = _decode_attention_triton(*(t.to(device) for t in (q, k, v, start, end)), 0.25, slots.to(device), 3,
                                   splits=splits)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b.cpu(), a, atol=2e-6, rtol=1e-5)


def test_splits_fill_the_gpu_at_small_batches_only():
    small, large = num_splits(2 * 16, 641, 132), num_splits(512 * 16, 641, 132)
    assert small > 1 and large == 1
    assert num_splits(2 * 16, 100, 132) == 1  # too few keys to split


def test_decode_attention_rejects_bad_shapes():
    q, k, v, start, end, _ = _case((2, 4, 3, 10, 8), torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :4], k, v, start, end, 1.0)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q[:, :3], k, v, start, end, 1.0, backend="flash")


# -- the engine on it -------------------------------------------------------------------------------------------------
PROMPTS = ["a red car", "a blue bench and a green apple on a wooden table near the tall tree", "a cat"]
OBJECTS = [["car"], ["bench", "apple", "tree"], ["cat"]]


def _variant(bundle, name, **text):
    """A random Janus of ``bundle``'s shape with text-config changes (kv heads, layers)."""
    from transformers import JanusForConditionalGeneration

    from ospo_fast.models.loader import JanusBundle

    config = copy.deepcopy(bundle.model.config)
    for key, value in text.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = bundle.model.generation_config
    return JanusBundle(model=model, processor=bundle.processor, source=name)


@pytest.fixture(scope="module")
def bundle():
    from ospo_fast.models import load_janus

    return load_janus("builtin:tiny-4", device="cpu")


@pytest.mark.parametrize("variant", [dict(num_key_value_heads=2, num_hidden_layers=7),
                                     dict(num_key_value_heads=1, num_hidden_layers=5)], ids=["gqa-7", "mqa-5"])
def test_engine_tokens_equal_transformers_generate_and_the_full_cache(bundle, variant):
    """Greedy tokens with the filled-slot decode attention equal transformers' generate (its own cache and SDPA)
    and the engine's full-cache SDPA, on ragged prompts, GQA and MQA, odd layer counts; seeded tokens equal the
    full-cache engine's."""
    model = _variant(bundle, "tiny-4-variant", **variant)
    greedy = ImageConfig(temperature=0.0, compile=False)
    ids, mask = image_prompt_inputs(model.processor, PROMPTS)
    expected = model.model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False,
                                    guidance_scale=greedy.guidance_scale)
    assert torch.equal(generate_images(model, PROMPTS, [0, 1, 2], greedy).tokens, expected)
    sampled = ImageConfig(temperature=1.0, compile=False)
    filled = generate_images(model, PROMPTS, [5, 6, 7], sampled, objects=OBJECTS)
    full = generate_images(model, PROMPTS, [5, 6, 7], sampled, objects=OBJECTS, attention="full")
    assert torch.equal(filled.tokens, full.tokens)
    torch.testing.assert_close(filled.object_maps, full.object_maps, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not triton_interpret(), reason="needs TRITON_INTERPRET=1")
def test_engine_on_the_triton_kernel_draws_the_same_images_and_maps(bundle):
    """The CUDA path's kernel (interpreted) inside the engine: the same tokens and captured maps as the CPU path
    and the full-cache SDPA (the maps: as eager output_attentions, which test_image_gen checks for the default)."""
    model = _variant(bundle, "tiny-4-3-layers", num_hidden_layers=3)  # the interpreter is slow: 3 layers, 2 prompts
    sampled = ImageConfig(temperature=1.0, compile=False)
    full = generate_images(model, PROMPTS[:2], [5, 6], sampled, objects=OBJECTS[:2], attention="full")
    kernel = generate_images(model, PROMPTS[:2], [5, 6], sampled, objects=OBJECTS[:2], attention="triton")
    assert torch.equal(kernel.tokens, full.tokens)
    torch.testing.assert_close(kernel.object_maps, full.object_maps, atol=1e-6, rtol=1e-5)


def test_left_padding_in_the_middle_of_a_prompt_is_refused(bundle):
    from ospo_fast.engine.image_gen import _POOL, _Sampling, _Shape

    decoder = _POOL.get(bundle.model, _Shape(1, 8, bundle.num_image_tokens, _Sampling(5.0, 1.0, 0, 1.0)), "cpu")
    ids = torch.ones(2, 8, dtype=torch.int64)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="left-padded"):
        decoder.start(ids, mask, torch.zeros(1, dtype=torch.int64), None)
    assert dataclasses.is_dataclass(decoder.slots)


def test_one_decoder_per_process_the_old_cache_freed_before_the_new(bundle, monkeypatch):
    """``images.batch_size: auto`` plans memory for one KV cache: a call with another prompt bucket or object
    bucket must drop the previous decoder (its cache) before it allocates the next one."""
    import gc
    import weakref

    from ospo_fast.engine import image_gen

    image_gen.release_decoders()
    alive: list[weakref.ref] = []
    built_with_others_alive = []
    original = image_gen._Decoder.__init__

    def tracking_init(self, *args, **kwargs):
        gc.collect()
        built_with_others_alive.append(sum(ref() is not None for ref in alive))
        original(self, *args, **kwargs)
        alive.append(weakref.ref(self.cache))

    monkeypatch.setattr(image_gen._Decoder, "__init__", tracking_init)
    config = ImageConfig(temperature=1.0, compile=False, batch_size=2)
    long_prompt = "a red car " * 30  # a second prompt bucket (> 64 tokens)
    generate_images(bundle, PROMPTS[:2], [0, 1], config)
    generate_images(bundle, [long_prompt, "a cat"], [0, 1], config)
    generate_images(bundle, PROMPTS[:2], [0, 1], config, objects=OBJECTS[:2])  # an object bucket
    assert built_with_others_alive == [0, 0, 0]
    assert len(image_gen._POOL._pool) == 1


@requires_cuda
def test_teacher_forced_maps_on_cuda_equal_the_cpus(bundle):
    """The mask pass's lse from CUDA's memory-efficient attention (bias padded to 16 keys) gives the CPU flash
    path's maps (float32 model, ragged prompts)."""
    from ospo_fast.engine.object_attention import teacher_forced_object_maps
    from ospo_fast.models import load_janus

    tokens = torch.randint(0, bundle.model.config.vq_config.num_embeddings, (3, bundle.num_image_tokens),
                           generator=torch.Generator().manual_seed(0))
    cpu = teacher_forced_object_maps(bundle, PROMPTS, tokens, OBJECTS, layers=[1, 2])
    cuda = teacher_forced_object_maps(load_janus("builtin:tiny-4", device="cuda"), PROMPTS, tokens, OBJECTS,
                                      layers=[1, 2])
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-4)


def test_in_flight_capture_of_chosen_heads_equals_the_full_cache_and_teacher_forcing(bundle):
    """Localisation heads in the decode steps: the filled-slot kernel's per-head probabilities weighted to the
    chosen pairs equal the full-cache SDPA path's, and the teacher-forced pass over the same tokens."""
    from ospo_fast.engine.object_attention import teacher_forced_object_maps

    heads = {1: (0, 2), 3: (1,)}
    sampled = ImageConfig(temperature=1.0, compile=False)
    filled = generate_images(bundle, PROMPTS, [5, 6, 7], sampled, objects=OBJECTS, mask_heads=heads)
    full = generate_images(bundle, PROMPTS, [5, 6, 7], sampled, objects=OBJECTS, mask_heads=heads, attention="full")
    torch.testing.assert_close(filled.object_maps, full.object_maps, atol=1e-6, rtol=1e-5)
    forced = teacher_forced_object_maps(bundle, PROMPTS, filled.tokens, OBJECTS, heads=heads)
    torch.testing.assert_close(filled.object_maps, forced, atol=1e-5, rtol=1e-4)
    every = generate_images(bundle, PROMPTS, [5, 6, 7], sampled, objects=OBJECTS, mask_layers=[1, 3])
    assert not torch.allclose(every.object_maps, filled.object_maps)  # the selection changes the maps
