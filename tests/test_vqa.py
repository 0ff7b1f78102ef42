"""Self-VQA with prefix caching against a plain per-question full forward of transformers' Janus."""

import numpy as np
import PIL.Image
import pytest
import torch

from ospo_fast.engine.vqa import VQA_SUFFIX, answer_token_ids, score_yes_no, vqa_prompt

QUESTIONS = [
    ["Is there a red car?", "Is there a dog?"],
    ["Is there a cat?"],
    [],
    ["Are there two blue birds on the tall tree?", "Is it wet?", "Is there a lamp?"],
]


def _bundle(dtype: str):
    """A private tiny model whose LM head is untied and sharper, so probabilities differ between questions."""
    from ospo_fast.models import load_janus

    bundle = load_janus("builtin:tiny", dtype=dtype, device="cpu")
    head = bundle.model.lm_head
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(head.weight.shape, generator=generator) * 0.5
    head.weight = torch.nn.Parameter(weight.to(head.weight.dtype))
    return bundle


@pytest.fixture(scope="module")
def bundles():
    return {"float32": _bundle("float32"), "bfloat16": _bundle("bfloat16")}


def _images(bundle):
    side = bundle.grid * 16
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in QUESTIONS]
    images[1] = PIL.Image.fromarray(images[1])
    images[3] = rng.integers(0, 256, (side + 7, side - 5, 3), dtype=np.uint8)  # odd size: the processor resizes
    return images


def _reference(bundle, image, question, ids):
    inputs = bundle.processor(text=[vqa_prompt(bundle.processor, question)], images=[image], return_tensors="pt")
    with torch.no_grad():
        probs = bundle.model(**inputs).logits[0, -1].float().softmax(-1)
    return (max(probs[ids["yes"]], probs[ids["Yes"]]).item(), max(probs[ids["no"]], probs[ids["No"]]).item())


def _flat(rows):
    return torch.tensor([p for row in rows for p in row], dtype=torch.float64)  # (sum K, 2)


@pytest.fixture(scope="module")
def float32_reference(bundles):
    bundle = bundles["float32"]
    ids = answer_token_ids(bundle)
    return _flat([[_reference(bundle, image, q, ids) for q in qs] for image, qs in zip(_images(bundle), QUESTIONS)])


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-4), ("bfloat16", None)])
def test_scores_equal_a_full_forward_per_question(bundles, float32_reference, dtype, rtol):
    """float32: allclose to transformers' full forward. bfloat16: the error against the float32 reference is
    bounded by twice transformers' own bfloat16 error on the same inputs."""
    bundle = bundles[dtype]
    images = _images(bundle)
    calls = []
    hook = bundle.model.model.vision_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        got = score_yes_no(bundle, images, QUESTIONS, batch_size=2)
    finally:
        hook.remove()
    assert calls == [2, 1]  # each image encoded once (image 2 has no questions)
    assert [len(g) for g in got] == [len(q) for q in QUESTIONS]
    want = float32_reference
    assert float(want[:, 0].max() / want[:, 0].min()) > 1.2  # the questions really are told apart
    if rtol is not None:
        torch.testing.assert_close(_flat(got), want, atol=1e-10, rtol=rtol)
        return
    ids = answer_token_ids(bundle)
    own = _flat([[_reference(bundle, image, q, ids) for q in qs] for image, qs in zip(images, QUESTIONS)])
    own_error = float(((own - want).abs() / want).max())
    assert float(((_flat(got) - want).abs() / want).max()) <= 2 * own_error + 1e-3


def test_prompt_and_answer_tokens_follow_the_chat_template(bundles):
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    bundle = bundles["float32"]
    text = vqa_prompt(bundle.processor, "Is there a cat?")
    image = bundle.processor.image_token
    assert text.startswith(DEFAULT_SYSTEM_PROMPT) and f"{image}\nIs there a cat?{VQA_SUFFIX}" in text
    ids = answer_token_ids(bundle)
    tok = bundle.tokenizer
    assert {word: tok.decode([i]) for word, i in ids.items()} == {w: f" {w}" for w in ("yes", "Yes", "no", "No")}
    # the template writes an answered turn as "<|Assistant|>: yes": the answer token follows the opened prompt
    user = {"role": "user", "content": [{"type": "text", "text": "Is there a cat?"}]}
    answered = bundle.processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}], tokenize=False)
    opened = bundle.processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    n = len(tok(opened)["input_ids"])
    assert tok(answered)["input_ids"][n] == ids["yes"]


def test_bad_arguments_raise_clear_errors(bundles):
    bundle = bundles["float32"]
    with pytest.raises(ValueError, match="question lists"):
        score_yes_no(bundle, _images(bundle)[:2], QUESTIONS)
    with pytest.raises(ValueError, match="batch_size"):
        score_yes_no(bundle, _images(bundle), QUESTIONS, batch_size=0)
    with pytest.raises(TypeError, match="numpy arrays"):
        score_yes_no(bundle, ["not an image"], [["Is it?"]])
