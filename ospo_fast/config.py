"""Configuration: one dataclass per stage, all defaults from SPEC.md (the authors' released code where the
paper and code differ). ``OSPOConfig`` is the single source of truth; YAML presets and ``key=value`` CLI
overrides change it; unknown keys and wrong types are errors; ``save_config`` writes the resolved config
beside every output.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

CATEGORIES = {
    "attribute": ["color", "shape", "texture"],
    "layout": ["spatial_2d", "spatial_3d", "numeracy"],
    "non_spatial": ["non_spatial"],
    "complex": ["complex"],
}


@dataclass
class ModelConfig:
    """Which Janus checkpoint to load. ``path``: a local directory, a hub id, or ``builtin:NAME`` for a model
    built by ``ospo_fast.models.factory`` (``builtin:tiny``) or shipped in the package (``builtin:toy``)."""

    path: str = "builtin:tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto": cuda when available, else cpu
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class PromptConfig:
    """Stage 1: base prompts by in-context learning (``source="model"``), a user file, or the rule sampler."""

    source: Literal["model", "sampler", "file"] = "model"
    file: str = ""  # a JSONL of {"prompt", "category", "structure"} records, for source="file"
    vocabulary: Literal["general", "toy"] = "general"  # word lists of the sampler and the rule perturbations
    num_prompts: int = 20000
    batch_size: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    num_exemplars: int = 3
    exemplar_refresh_every: int = 100  # batches
    max_numeracy: int = 4  # numeracy prompts keep the numbers one..four
    categories: list[str] = field(default_factory=lambda: [s for subs in CATEGORIES.values() for s in subs])
    chunk_size: int = 64  # records per resumable chunk in every stage


@dataclass
class PerturbConfig:
    """Stage 2a: N perturbed prompts per base prompt that change object-level detail only. ``best_of_n`` is the
    SILMM-style baseline instead: no perturbation, 2N images of x, best vs worst Self-VQA score."""

    source: Literal["model", "rules", "best_of_n"] = "model"
    num_perturbations: int = 3
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_size: int = 32


@dataclass
class DensifyConfig:
    """Stage 2b: each (x, x~_n) pair is rewritten jointly into two long prompts sharing one scene."""

    enabled: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_size: int = 32


@dataclass
class ImageConfig:
    """Stage 3: classifier-free-guided image generation (Janus)."""

    guidance_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0  # 0: off (plain multinomial sampling, as the reference)
    top_p: float = 1.0
    batch_size: int = 16
    # torch.compile of the decode step: "auto" on CUDA only (CUDA graphs), true also on CPU (inductor), false never
    compile: Literal["auto", True, False] = "auto"


@dataclass
class MaskConfig:
    """Stage 3: object masks from the model's own attention (image-token queries -> object-word keys)."""

    skip_layers: int = 5  # drop the first and last k layers
    otsu_scale: float = 0.8  # reference code multiplies Otsu's threshold by 0.8
    context: Literal["base", "generation"] = "base"
    gaussian_kernel: int = 5
    gaussian_sigma: float = 1.0
    backend: Literal["auto", "ref", "cpp", "triton"] = "auto"


@dataclass
class QuestionConfig:
    """Stage 4: K atomic yes/no questions per base prompt."""

    source: Literal["model", "rules"] = "model"
    temperature: float = 1.2
    top_p: float = 0.5
    max_new_tokens: int = 256
    max_questions: int = 8
    batch_size: int = 32


@dataclass
class FilterConfig:
    """Stage 4: keep informative pairs. Drop if S(y_w) < tau or y_w got no yes; drop if every s_k(y_l) > 0."""

    tau: float = 0.6
    enabled: bool = True
    vqa_batch_size: int = 16


@dataclass
class LossConfig:
    """Stage 5: L = L_ObjSimPO + sft_weight * L_SFT (reference code defaults)."""

    beta: float = 5.0
    gamma_beta_ratio: float = 0.5
    alpha: float = 1.0
    sft_weight: float = 2.0
    normalization: Literal["weighted_mean", "length"] = "weighted_mean"
    mask_smoothing: Literal["gaussian", "binary"] = "gaussian"
    label_smoothing: float = 0.0
    fused: bool = True  # fuse the generation head's last Linear with the loss (no full logits)
    backend: Literal["auto", "ref", "cpp", "triton"] = "auto"


@dataclass
class TrainConfig:
    """Stage 5: optimisation (reference: LoRA r64/a128 on q,k,v,o,gate,up,down; AdamW 1e-5; cosine)."""

    lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr: float = 1e-7
    max_grad_norm: float = 1.0
    per_device_batch: int = 16
    grad_accum: int = 2
    max_steps: int = 600
    epochs: int = 0  # 0: run max_steps; >0: run this many passes over the pairs (max_steps then caps it)
    bf16: bool = True  # autocast on CUDA only
    gradient_checkpointing: bool = True
    save_every: int = 100
    log_every: int = 1
    max_nonfinite_in_row: int = 10
    tensorboard: bool = False
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: DDP with LoRA, FSDP2 for full fine-tuning
    token_source: Literal["tokens", "reencode"] = "tokens"  # reencode: VQ-encode the saved PNGs (reference code)
    unfreeze: list[str] = field(default_factory=list)  # full fine-tuning only: e.g. [generation_head]


@dataclass
class EvalConfig:
    """Judged alignment before and after training (toy world only: an exact judge exists there)."""

    toy_heldout_prompts: int = 64  # 0: skip
    batch_size: int = 32
    # Also judge at these CFG weights (images.guidance_scale is always judged); 1.0 = the conditional model alone
    toy_extra_guidance: list[float] = field(default_factory=list)


@dataclass
class OSPOConfig:
    """The whole run. ``seed`` seeds every stage; ``iterations`` > 1 runs iterative OSPO."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    questions: QuestionConfig = field(default_factory=QuestionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    iterations: int = 1


class ConfigError(ValueError):
    """A config key or value that does not fit; the message names it and what is valid."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(path: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list of {item_type.__name__}, e.g. {path}=[a,b]")
        return [_check_value(f"{path}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{path}: union types are not supported in configs")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}={value!r} must be true or false")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}={value!r} must be an integer")
    if not isinstance(value, annotation):
        raise ConfigError(f"{path}={value!r} must be of type {annotation.__name__}, got {type(value).__name__}")
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(types_)}")
        annotation = types_[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                example = next(iter(_field_types(annotation)))
                raise ConfigError(f"{path} is a section; give keys like {path}.{example}=...")
            _apply(getattr(obj, key), value, prefix=f"{path}.")
        else:
            setattr(obj, key, _check_value(path, value, annotation))


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=2e-5"`` -> ``{"train": {"lr": 2e-05}}``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=2e-5")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> OSPOConfig:
    """Defaults, then a preset (a name from ``presets/`` or a YAML path), then ``key=value`` overrides."""
    config = OSPOConfig()
    if preset:
        path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {preset!r} not found (looked at {path}); presets: {preset_names()} "
                              "or a path to a .yaml file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"preset {path} must hold a mapping of sections, got {type(data).__name__}")
        _apply(config, data)
    for text in overrides:
        _apply(config, parse_override(text))
    return config


def config_to_dict(config: OSPOConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> OSPOConfig:
    config = OSPOConfig()
    _apply(config, data)
    return config


def save_config(config: OSPOConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    from ospo_fast.store import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))
