"""What every stage function receives: the resolved config, the model (loaded on first use), the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

from ospo_fast.config import OSPOConfig, check_config
from ospo_fast.stages.structure import VOCABULARIES, Vocabulary

HEADS_SEED_SALT = 7919  # localisation heads are chosen on prompts drawn at seed + this: never the run's own


@dataclass
class StageContext:
    config: OSPOConfig
    device: str = "auto"
    # the prompt length an "auto" images.batch_size was planned for (ospo_fast.plan); None: a batch the user gave
    planned_image_prompt: int | None = None
    _bundle: object = field(default=None, repr=False)
    _heads: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_config(self.config)  # a config built in Python is checked as load_config checks, before any model loads

    @property
    def vocab(self) -> Vocabulary:
        return VOCABULARIES[self.config.prompts.vocabulary]

    @property
    def bundle(self):
        """The Janus model and processor (``ospo_fast.models.JanusBundle``), loaded once."""
        if self._bundle is None:
            from ospo_fast.models import load_janus

            m = self.config.model
            self._bundle = load_janus(m.path, dtype=m.dtype, device=self.device if m.device == "auto" else m.device,
                                      attn_implementation=m.attn_implementation)
        return self._bundle

    def localization_heads(self):
        """``masks.heads=localization``: the model's localisation heads (``engine.localization_heads``), chosen once
        per process from images it draws of prompts the run's sampler makes at a salted seed (the same in every
        process and on resume, whatever the run's own records); None with ``masks.heads=all``."""
        masks = self.config.masks
        if masks.heads != "localization":
            return None
        if self._heads is None:
            from ospo_fast.engine.localization_heads import find_localization_heads
            from ospo_fast.ops.object_masks import select_layers
            from ospo_fast.stages.prompts import sample_prompts

            seed = self.config.seed + HEADS_SEED_SALT
            records = sample_prompts(self.vocab, self.config.prompts, list(range(masks.localization_images)), seed)
            self._heads = find_localization_heads(
                self.bundle, [r["prompt"] for r in records], [list(r["structure"]["objects"]) for r in records],
                [seed + i for i in range(len(records))], self.config.images, masks.localization_heads,
                select_layers(self.bundle.num_layers, masks.skip_layers))
        return self._heads

    def stage_notes(self, stage: str) -> dict:
        """What a stage's manifest entry records besides its counts: the mask heads of stage 3."""
        heads = self.localization_heads() if stage == "images" else None
        return {"mask_heads": heads.summary()} if heads is not None else {}
