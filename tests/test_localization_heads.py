"""Localisation heads (issue 37): per-head maps against transformers' eager attentions, the label-free criterion
on planted maps, and the choice recorded by a synthesis run."""

import pytest
import torch

from ospo_fast.engine.localization_heads import choose_heads, head_object_maps, score_heads
from ospo_fast.engine.object_attention import object_token_positions, objects_valid, teacher_forced_inputs
from tests.eager_reference import eager_object_maps

PROMPTS = ["a red car and a blue bench near a tree", "a dog", "two cats beside a lamp"]
OBJECTS = [["car", "bench", "tree"], ["dog"], ["cats", "lamp"]]


def test_head_maps_average_to_eager_output_attentions(tiny_bundle):
    """Each (layer, head) map is that head's attention from image-token queries to the object's sub-tokens: their
    mean over heads and layers is the reference code's map."""
    tokens = torch.randint(0, tiny_bundle.model.config.vq_config.num_embeddings, (3, 64),
                           generator=torch.Generator().manual_seed(0))
    layers = [2, 5]
    maps = head_object_maps(tiny_bundle, PROMPTS, tokens, OBJECTS, layers, chunk=2)  # (L, H, B, O, N)
    batch = teacher_forced_inputs(tiny_bundle, PROMPTS, tokens)
    positions = object_token_positions(tiny_bundle.tokenizer, batch["input_ids"], OBJECTS)
    eager = eager_object_maps(tiny_bundle, batch, positions, layers)  # (B, O, G, G)
    torch.testing.assert_close(maps.mean(dim=(0, 1)).view_as(eager), eager, atol=1e-6, rtol=1e-5)
    one = eager_object_maps(tiny_bundle, batch, positions, heads={5: [3]})
    torch.testing.assert_close(maps[1, 3].view_as(one), one, atol=1e-6, rtol=1e-5)


def test_the_criterion_picks_focused_heads_that_look_at_the_words():
    """Planted maps over 16 cells: head 0 spreads its attention evenly (high mass, entropy 1), head 1 puts it on
    one cell (focused), head 2 is focused but pays the words almost nothing (below the median mass), head 3 is
    half focused. The two chosen are 1 then 3."""
    n = 16
    maps = torch.zeros(1, 4, 2, 1, n)  # (L, H, B, O, N)
    maps[0, 0] = 0.05
    maps[0, 1, :, :, 3] = 0.5
    maps[0, 2, :, :, 7] = 1e-4
    maps[0, 3, :, :, :2] = 0.25
    mass, entropy = score_heads(maps, torch.ones(2, 1, dtype=torch.bool))
    assert entropy[0, 0] == pytest.approx(1.0) and entropy[0, 1] == pytest.approx(0.0, abs=1e-9)
    assert mass[0, 0] == pytest.approx(0.05) and mass[0, 2] < mass.median()
    assert choose_heads(mass, entropy, [4], k=2) == [(4, 1), (4, 3)]


def test_padded_objects_do_not_count():
    maps = torch.rand(1, 2, 2, 2, 9)
    maps[:, :, 1, 1] = 0.0  # image 1's second object is padding
    valid = objects_valid([["a", "b"], ["c"]])
    mass, _ = score_heads(maps, valid)
    expected = (maps[:, :, 0, 0].mean(-1) + maps[:, :, 0, 1].mean(-1) + maps[:, :, 1, 0].mean(-1)) / 3
    torch.testing.assert_close(mass, expected.double())


def test_a_synthesis_with_localization_heads_records_them(tmp_path):
    """masks.heads=localization: the images stage's manifest entry and the run's stage summary name the k heads,
    chosen from the model's own images of other prompts; every mask then averages only those."""
    from ospo_fast.config import load_config
    from ospo_fast.pipeline import Pipeline
    from ospo_fast.run import stage_summary

    overrides = ["prompts.num_prompts=2", "perturb.num_perturbations=1", "images.batch_size=2",
                 "filter.enabled=false", "filter.vqa_batch_size=4", "model.device=cpu", "model.path=builtin:tiny-4",
                 "masks.heads=localization", "masks.localization_heads=2", "masks.localization_images=4"]
    Pipeline(load_config("tiny", overrides), tmp_path, progress=False).run()
    heads = stage_summary(tmp_path)["mask_heads"]
    assert len(heads["heads"]) == 2 and heads["images"] == 4
    assert all(len(h.split(".")) == 2 for h in heads["heads"])


def test_the_heads_are_chosen_once_per_model_and_settings(tmp_path, monkeypatch):
    """A model's heads are kept under its identity (content) and the settings that choose them: a second context
    reads them back without drawing; another model, or other settings, chooses afresh."""
    import ospo_fast.engine.localization_heads as lh
    from ospo_fast.config import load_config
    from ospo_fast.stages.context import StageContext

    monkeypatch.setenv("OSPO_FAST_CACHE", str(tmp_path / "cache"))
    calls = []
    real = lh.find_localization_heads
    monkeypatch.setattr(lh, "find_localization_heads", lambda *a, **k: calls.append(1) or real(*a, **k))
    overrides = ["model.path=builtin:tiny-4", "model.device=cpu", "masks.heads=localization",
                 "masks.localization_heads=2", "masks.localization_images=2", "images.batch_size=2"]
    first = StageContext(load_config("tiny", overrides), device="cpu").localization_heads()
    again = StageContext(load_config("tiny", overrides), device="cpu").localization_heads()
    assert again == first and len(calls) == 1
    StageContext(load_config("tiny", [*overrides, "masks.localization_heads=1"]), device="cpu").localization_heads()
    assert len(calls) == 2
    (cached,) = [p for p in (tmp_path / "cache" / "localization-heads").iterdir()
                 if lh.LocalizationHeads.read(p) == first]
    cached.write_text("{damaged")  # a damaged cache entry only costs a new choice
    assert StageContext(load_config("tiny", overrides), device="cpu").localization_heads() == first
    assert len(calls) == 3
