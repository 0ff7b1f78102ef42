"""The toy model's diagnostic probes (recipes/toy_janus/probes/: toy_grounding_probe.py, toy_t2i_breakdown.py,
toy_guidance_probe.py), whose figures BUILD.md reports as the measured reasons for issue #16's unmet targets: their
building blocks agree with transformers' own masking, the processor's real prompt layout and the exact judge."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ospo_fast.engine.object_attention import encode_pixels_to_tokens, teacher_forced_inputs
from ospo_fast.engine.prompts import prompt_token_ids
from ospo_fast.toy import world
from ospo_fast.toy.judge import JudgeResult, judge
from recipes.toy_janus.probes.toy_grounding_probe import (
    image_nll,
    layer_breakdown,
    object_cells,
    ring_cells,
    template_suffix_length,
    token_classes,
)
from recipes.toy_janus.probes.toy_guidance_probe import token_logprobs
from recipes.toy_janus.probes.toy_t2i_breakdown import failure_cause, shape_confusions


@pytest.fixture(scope="module")
def renders(toy):
    """Three held-out two-object captions of different lengths, their renders' VQ tokens and scenes."""
    rng = np.random.default_rng(3)
    specs = [s for s in world.split_specs("heldout") if s.relation][:3]
    scenes = [world.scene_from_spec(s, rng) for s in specs]
    captions = [world.caption_of_spec(s) for s in specs]
    tokens = encode_pixels_to_tokens(toy, torch.from_numpy(np.stack([world.render(s) for s in scenes])))
    return captions, tokens, scenes


def test_template_suffix_is_what_the_processor_appends_after_the_caption(toy):
    """The suffix is the chat template's text after the caption plus ``<begin_of_image>``, as the processor lays
    out the prompt: the trailing ids of a prompt equal those of the template's own ending."""
    suffix = template_suffix_length(toy.processor)
    ids = prompt_token_ids(toy.processor, "a purple triangle above a cyan square")
    text = toy.processor.apply_chat_template([{"role": "user", "content": "X"}], add_generation_prompt=True)
    ending = text[text.index("X") + 1:]
    expected = toy.tokenizer(ending, add_special_tokens=False)["input_ids"]
    expected += [toy.tokenizer.convert_tokens_to_ids(toy.processor.image_start_token)]
    assert ids[-suffix:] == expected
    assert toy.tokenizer.decode(ids[-suffix - 1:-suffix]).strip() == "square"  # the caption ends right before


def test_token_classes_name_every_caption_word(toy, renders):
    captions, tokens, _ = renders
    inputs = teacher_forced_inputs(toy, captions, tokens)
    ids, t = inputs["input_ids"], inputs["input_ids"].shape[1]
    classes = token_classes(toy, ids, inputs["attention_mask"][:, :t], template_suffix_length(toy.processor))
    for caption, row in zip(captions, classes):
        words = caption.split()
        assert row.count("shape") == sum(w in world.SHAPES for w in words)
        assert row.count("colour") == sum(w in world.COLORS for w in words)
        assert row[-1] == "boi" and row.count("bos") == 1
    assert any("pad" in row for row in classes)  # the captions differ in length: left padding is classed apart


def test_image_nll_with_nothing_hidden_is_transformers_own_masking(toy, renders):
    """The probe's custom 4D mask (causal + padding) gives the NLL that transformers' 2D padding mask gives, and
    hiding the caption's words from the image positions changes it."""
    captions, tokens, _ = renders
    inputs = teacher_forced_inputs(toy, captions, tokens)
    model, t = toy.model, inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=inputs["inputs_embeds"],
                                         attention_mask=inputs["attention_mask"],
                                         position_ids=inputs["position_ids"], use_cache=False)
        logits = model.model.generation_head(out.last_hidden_state[:, t - 1:-1])
        reference = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).item()
        nothing = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        assert image_nll(toy, inputs, tokens).mean().item() == pytest.approx(reference, rel=1e-5)
        assert image_nll(toy, inputs, tokens, nothing).mean().item() == pytest.approx(reference, rel=1e-5)
        classes = token_classes(toy, inputs["input_ids"], inputs["attention_mask"][:, :t],
                                template_suffix_length(toy.processor))
        words = torch.tensor([[c in ("shape", "colour", "other word") for c in row] for row in classes])
        assert abs(image_nll(toy, inputs, tokens, words).mean().item() - reference) > 1e-3


def test_failure_cause_follows_the_judge():
    """A true render is strict right; details failing each check in turn give that check's cause."""
    scene = world.scene_from_spec(next(s for s in world.split_specs("heldout") if s.relation),
                                  np.random.default_rng(0))
    assert failure_cause(judge(world.render(scene), world.structure(scene))) == "strict right"
    base = {"colours": True, "relations": True, "shapes": True, "extra_blobs": 0, "found": {}}
    cases = [({"colours": False, "relations": False}, "colour missing"), ({"relations": False}, "relation wrong"),
             ({"shapes": False}, "shape wrong"), ({"extra_blobs": 2}, "extra blob"),
             ({"shapes": False, "extra_blobs": 1}, "shape wrong + extra blob"), ({}, "strict right")]
    for change, cause in cases:
        assert failure_cause(JudgeResult(strict=False, loose=True, details={**base, **change})) == cause
    found = {"circle": {"shape": "triangle"}, "square": {"shape": "square"}, "red": {"shape": "circle"}}
    assert shape_confusions(JudgeResult(False, True, {**base, "found": found})) == ["circle->triangle"]


def test_background_code_share_on_the_shipped_vq(toy, renders, metrics):
    """An empty image's own codes are all "as empty"; v2.2's VQ, retrained with the locality loss at weight 10
    (BUILD.md "A local enough VQ"), keeps the empty image's code on most plain-background cells of real scenes,
    where v2.1's global codes kept 1.4%: the figure the probe and the recipe print."""
    _, tokens, scenes = renders
    images = np.stack([world.render(scene) for scene in scenes])
    empty = np.stack([world.empty_render()] * 2)
    empty_tokens = encode_pixels_to_tokens(toy, torch.from_numpy(empty[:1]))
    assert world.background_code_share(encode_pixels_to_tokens(toy, torch.from_numpy(empty)).numpy(),
                                       empty_tokens.numpy(), empty) == 1.0
    assert metrics["build"]["vq_local_weight"] == 10 and metrics["vq"]["background_codes_as_empty"] > 0.5
    assert world.background_code_share(tokens.numpy(), empty_tokens.numpy(), images) > 0.4


def test_layer_breakdown_ratios_on_planted_attention():
    """Planted attention with a known answer: object 0's word read twice as much from its own cells, and the word of
    the object still to come read ``pending`` times as much between the two onsets. The position-controlled ratios
    (own word/other, pending/drawn) must return exactly what was planted."""
    grid, t = 8, 4
    scene = world.Scene((world.ToyObject("circle", "red", 14, 14, 20), world.ToyObject("square", "blue", 44, 44, 20)),
                        "above")
    images = world.render(scene)[None]
    untouched = world.plain_background_cells(images, grid)
    cells = [object_cells(obj, grid) for obj in scene.objects]
    assert np.argmax(cells[0]) < np.argmax(cells[1])  # object 0 is drawn first
    ring = ring_cells(cells[0], grid)
    assert not (ring & cells[0]).any() and ring.sum() > 0
    classes = [["bos", "shape", "shape", "boi"]]
    positions = torch.tensor([[[1], [2]]])  # (B, O, S): each object's word key
    for pending in (1.0, 3.0):
        attention = torch.ones(1, 2, t + grid * grid, t + grid * grid).tril()
        image = attention[0, :, t:, 1]
        image[:, torch.from_numpy(cells[0])] = 2.0  # object 0's word, read from its own cells
        window = np.zeros(grid * grid, dtype=bool)
        window[np.argmax(cells[0]) + 1:np.argmax(cells[1])] = True
        window &= untouched[0] & ~ring & ~cells[0] & ~ring_cells(cells[1], grid) & ~cells[1]  # away from both
        attention[0, :, t:, 2][:, torch.from_numpy(window)] = pending  # object 1's word before object 1 starts
        result = layer_breakdown(attention, classes, [scene], positions, grid, untouched)
        assert result["own_word_over_other_word"] == pytest.approx(1.5)  # (2/1 + 1/1) / 2 over object 0 and 1
        assert result["pending_over_drawn"] == pytest.approx(pending)
        assert np.isfinite(result["copy_over_chance"])
        if pending == 1.0:  # own/other is not position-controlled, but here only object 0's own cells differ
            assert result["own_over_other"] == pytest.approx(1.5)
            by_row = 2.0 + cells[0].reshape(grid, grid).mean(1)  # word 1 reads 1, word 0 reads 1 plus its cells
            assert np.allclose(result["shape_words_by_row"], by_row)


def test_guidance_probe_splits_cells_by_the_empty_images_code(toy, renders):
    """The guidance probe's conditional log-probs, over all cells and split into the cells holding the empty image's
    code and the rest, are transformers' own teacher-forced ones (``image_nll``) averaged over those cells; a
    rejected image that is the empty image but for 4 cells has 60 of 64 empty-code cells."""
    captions, tokens, _ = renders
    empty_tokens = encode_pixels_to_tokens(toy, torch.from_numpy(world.empty_render()[None]))
    rejected = empty_tokens.clone()
    rejected[0, :4] = (empty_tokens[0, :4] + 1) % toy.model.config.vq_config.num_embeddings
    pair = {"prompt": captions[0], "chosen": {"tokens": tokens[0].tolist()},
            "rejected": {"tokens": rejected[0].tolist()}}
    result = token_logprobs("builtin:toy", [pair], guidance=5.0)
    with torch.no_grad():
        reference = -image_nll(toy, teacher_forced_inputs(toy, captions[:1], tokens[:1]), tokens[:1])[0]  # (N,)
    empty = tokens[0] == empty_tokens[0]
    assert 0 < empty.sum() < len(empty)  # both kinds of cell are there
    chosen = result["chosen"]
    assert chosen["all"]["cond"] == pytest.approx(reference.mean().item(), abs=1e-4)
    assert chosen["empty_code"]["cond"] == pytest.approx(reference[empty].mean().item(), abs=1e-4)
    assert chosen["other"]["cond"] == pytest.approx(reference[~empty].mean().item(), abs=1e-4)
    assert chosen["empty_code_share"] == pytest.approx(empty.float().mean().item())
    assert result["rejected"]["empty_code_share"] == pytest.approx(60 / 64)
    for side in ("chosen", "rejected"):  # the mixture u + 5 (c - u) is another distribution than either branch
        assert result[side]["all"]["cfg"] != pytest.approx(result[side]["all"]["cond"], abs=1e-3)


def test_budget_experiment_standard_error_is_paired_and_clustered_by_caption():
    """toy_budget.py's change SE: with one image per caption it is the paired t standard error s/sqrt(n); when each
    caption's images agree (a cluster of copies), it counts captions, not images, so copies add no precision."""
    from recipes.toy_janus.probes.toy_budget import eval_prompts, paired_change

    rng = np.random.default_rng(0)
    before, after = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    change, se = paired_change(list(after), list(before), [str(i) for i in range(200)])
    d = after - before
    assert change == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(200))
    copies = 4  # each caption's image drawn 4 times with the same verdicts
    _, clustered = paired_change(list(np.repeat(after, copies)), list(np.repeat(before, copies)),
                                 [str(i) for i in np.repeat(np.arange(200), copies)])
    assert clustered == pytest.approx(se, rel=1e-9)  # not se / 2: 800 images of 200 captions are 200 units
    held_out = eval_prompts(640)
    assert all(world.is_heldout(r["prompt"]) for r in held_out) and len(held_out) == 640
