"""What every stage function receives: the resolved config, the model (loaded on first use), the vocabulary."""

from __future__ import annotations

import json
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
        """``masks.heads=localization``: the model's localisation heads (``engine.localization_heads``), chosen from
        images it draws of prompts the run's sampler makes at a salted seed (the same in every process and on
        resume, whatever the run's own records), once per model and settings: kept under the model's identity
        (``_heads_cache_path``) for every later run; None with ``masks.heads=all``."""
        masks = self.config.masks
        if masks.heads != "localization":
            return None
        if self._heads is None:
            from ospo_fast.engine.localization_heads import LocalizationHeads, find_localization_heads
            from ospo_fast.ops.object_masks import select_layers
            from ospo_fast.stages.prompts import sample_prompts

            cache = self._heads_cache_path()
            self._heads = LocalizationHeads.read(cache)
            if self._heads is None:
                seed = self.config.seed + HEADS_SEED_SALT
                records = sample_prompts(self.vocab, self.config.prompts, list(range(masks.localization_images)),
                                         seed)
                self._heads = find_localization_heads(
                    self.bundle, [r["prompt"] for r in records], [list(r["structure"]["objects"]) for r in records],
                    [seed + i for i in range(len(records))], self.config.images, masks.localization_heads,
                    select_layers(self.bundle.num_layers, masks.skip_layers))
                self._heads.write(cache)
        return self._heads

    def _heads_cache_path(self):
        """Where the localisation heads of this model (by content) and these settings are kept, so a model's heads
        are chosen once, not in every run: ``<cache_dir>/localization-heads/<sha256 of the fingerprint>.json``."""
        from ospo_fast.models.loader import model_identity
        from ospo_fast.store import cache_dir, config_fingerprint, sha256_bytes

        c = self.config
        fingerprint = config_fingerprint({
            "model.identity": model_identity(c.model.path), "model.dtype": c.model.dtype, "seed": c.seed,
            "images": c.images, "masks.localization_heads": c.masks.localization_heads,
            "masks.localization_images": c.masks.localization_images, "masks.skip_layers": c.masks.skip_layers,
            "prompts.vocabulary": c.prompts.vocabulary, "prompts.categories": c.prompts.categories,
            "criterion": 1})
        digest = sha256_bytes(json.dumps(fingerprint, sort_keys=True).encode("utf-8"))
        return cache_dir() / "localization-heads" / f"{digest}.json"

    def stage_notes(self, stage: str) -> dict:
        """What a stage's manifest entry records besides its counts: the mask heads of stage 3."""
        heads = self.localization_heads() if stage == "images" else None
        return {"mask_heads": heads.summary()} if heads is not None else {}
