"""What every stage function receives: the resolved config, the model (loaded on first use), the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

from ospo_fast.config import OSPOConfig, check_config
from ospo_fast.stages.structure import VOCABULARIES, Vocabulary


@dataclass
class StageContext:
    config: OSPOConfig
    device: str = "auto"
    _bundle: object = field(default=None, repr=False)

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
