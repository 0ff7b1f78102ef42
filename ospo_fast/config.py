"""Configuration: one dataclass per stage, all defaults from SPEC.md (the authors' released code where the
paper and code differ). ``OSPOConfig`` is the single source of truth; YAML presets and ``key=value`` CLI
overrides change it; unknown keys, wrong types and values outside a field's valid range are errors, all reported
at once (``check_config``); ``save_config`` writes the resolved config beside every output.

Each field is declared with ``setting(default, rule)``: its default and its valid values (a ``Rule``) in one
place. ``Literal`` fields and bools take ``TYPED``: their annotation is the rule.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
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


class ConfigError(ValueError):
    """A config key or value that does not fit; the message names it and what is valid."""


@dataclass(frozen=True)
class Rule:
    """The valid values of one config field, kept beside its default (``setting(default, rule)``).

    ``valid``: what a valid value is, in words (printed in errors); ``test(value)`` -> True when it is valid."""

    valid: str
    test: Callable[[Any], bool]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: int | float) -> Rule:
    """A number >= lo (counts: at_least(1))."""
    return Rule(f">= {lo}", lambda v: _number(v) and v >= lo)


def positive() -> Rule:
    """A finite number > 0."""
    return Rule("> 0 (and finite)", lambda v: _number(v) and v > 0)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A number in the interval lo..hi; ``lo_open`` / ``hi_open`` exclude an end."""
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Rule(text, lambda v: _number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))


def odd_at_most(hi: int) -> Rule:
    return Rule(f"an odd integer in [1, {hi}]", lambda v: _number(v) and 1 <= v <= hi and v % 2 == 1)


def non_empty() -> Rule:
    return Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")


def list_of(item: Rule | None = None, *, length: int | None = None, min_length: int = 0,
            choices: tuple[str, ...] | None = None, unique: bool = False) -> Rule:
    """A list whose items pass ``item`` (or are in ``choices``), of ``length`` items or at least ``min_length``."""
    parts = [f"a list of {length}" if length is not None else "a list"]
    if min_length and length is None:
        parts.append(f"of at least {min_length}")
    parts.append(f"items {item.valid}" if item else "items")
    if choices is not None:
        parts.append(f"from {list(choices)}")
    if unique:
        parts.append("without repeats")

    def test(v: Any) -> bool:
        if not isinstance(v, list) or len(v) < min_length or (length is not None and len(v) != length):
            return False
        if unique and len(set(v)) != len(v):
            return False
        return all((item is None or item.test(x)) and (choices is None or x in choices) for x in v)

    return Rule(" ".join(parts), test)


# A bool, or a Literal whose choices the type check already enforces (they stand in the annotation).
TYPED = Rule("as its type says", lambda v: True)
DEVICE = Rule("auto, cpu, cuda or cuda:N", lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)
              is not None)
COUNT = at_least(1)
# a batch size, or "auto": the largest that fits the device's memory (ospo_fast.plan.auto_batch, at run start)
BATCH = Rule(">= 1 or auto", lambda v: v == "auto" or (_number(v) and v >= 1))
PROBABILITY = between(0, 1, lo_open=True)  # top_p
TEMPERATURE = between(0, 100)  # 0: greedy; a softmax at T > 100 is uniform to within float32 anyway
SUBCATEGORIES = tuple(s for subs in CATEGORIES.values() for s in subs)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNFREEZABLE = ("generation_embeddings", "generation_aligner", "generation_head", "aligner", "vision_model",
               "vqmodel")  # modules of JanusModel that full fine-tuning may also train


def setting(default: Any = dataclasses.MISSING, rule: Rule = TYPED, *,
            factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its default (or ``factory`` for lists) and its valid values (``rule``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass
class ModelConfig:
    """Which Janus checkpoint to load. ``path``: a local directory, a hub id, or ``builtin:NAME`` for a model
    built by ``ospo_fast.models.factory`` (``builtin:tiny``) or shipped in the package (``builtin:toy``)."""

    path: str = setting("builtin:tiny", non_empty())
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32")
    device: str = setting("auto", DEVICE)  # "auto": cuda when available, else cpu
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting("sdpa")


@dataclass
class PromptConfig:
    """Stage 1: base prompts by in-context learning (``source="model"``), a user file, or the rule sampler."""

    source: Literal["model", "sampler", "file"] = setting("model")
    # a JSONL of {"prompt", "category", "structure"} records, for source="file" (then required)
    file: str = setting("", Rule("a path (required when prompts.source=file)", lambda v: isinstance(v, str)))
    vocabulary: Literal["general", "toy"] = setting("general")  # word lists of the sampler and the rule perturbations
    num_prompts: int = setting(20000, between(1, 10_000_000))  # the paper's scale is 20,000
    batch_size: int = setting(32, COUNT)
    temperature: float = setting(1.0, TEMPERATURE)
    top_p: float = setting(1.0, PROBABILITY)
    max_new_tokens: int = setting(512, COUNT)
    num_exemplars: int = setting(3, at_least(0))
    exemplar_refresh_every: int = setting(100, COUNT)  # batches
    max_numeracy: int = setting(4, between(1, 4))  # numeracy prompts keep the numbers one..four
    categories: list[str] = setting(rule=list_of(min_length=1, choices=SUBCATEGORIES, unique=True),
                                    factory=lambda: list(SUBCATEGORIES))
    chunk_size: int = setting(64, COUNT)  # records per resumable chunk in every stage


@dataclass
class PerturbConfig:
    """Stage 2a: N perturbed prompts per base prompt that change object-level detail only. ``best_of_n`` is the
    SILMM-style baseline instead: no perturbation, 2N images of x, best vs worst Self-VQA score."""

    source: Literal["model", "rules", "best_of_n"] = setting("model")
    num_perturbations: int = setting(3, COUNT)
    temperature: float = setting(1.0, TEMPERATURE)
    top_p: float = setting(0.9, PROBABILITY)
    max_new_tokens: int = setting(512, COUNT)
    batch_size: int = setting(32, COUNT)


@dataclass
class DensifyConfig:
    """Stage 2b: each (x, x~_n) pair is rewritten jointly into two long prompts sharing one scene."""

    enabled: bool = setting(True)
    temperature: float = setting(1.0, TEMPERATURE)
    top_p: float = setting(0.9, PROBABILITY)
    max_new_tokens: int = setting(512, COUNT)
    batch_size: int = setting(32, COUNT)


@dataclass
class ImageConfig:
    """Stage 3: classifier-free-guided image generation (Janus)."""

    guidance_scale: float = setting(5.0, between(0, 1000))  # 1: the conditional model alone
    temperature: float = setting(1.0, TEMPERATURE)
    top_k: int = setting(0, at_least(0))  # 0: off (plain multinomial sampling, as the reference)
    top_p: float = setting(1.0, PROBABILITY)
    batch_size: int | Literal["auto"] = setting(16, BATCH)  # images (2 rows each under CFG)
    # torch.compile of the decode step: "auto" on CUDA only (CUDA graphs), true also on CPU (inductor), false never
    compile: Literal["auto", True, False] = setting("auto")
    # sequential: one forward per image token; jacobi: exact Jacobi iteration over a window of future tokens (the
    # same images in fewer forwards; ospo_fast.engine.image_gen). jacobi_window: draft tokens fed per forward
    decoding: Literal["sequential", "jacobi"] = setting("sequential")
    jacobi_window: int = setting(16, between(1, 256))


@dataclass
class MaskConfig:
    """Stage 3: object masks from the model's own attention (image-token queries -> object-word keys)."""

    skip_layers: int = setting(5, at_least(0))  # drop the first and last min(k, (L - 1) // 2) of the L layers
    otsu_scale: float = setting(0.8, positive())  # reference code multiplies Otsu's threshold by 0.8
    context: Literal["base", "generation"] = setting("base")
    gaussian_kernel: int = setting(5, odd_at_most(63))  # a 24x24 grid needs no wider smoothing window
    gaussian_sigma: float = setting(1.0, positive())
    backend: Literal["auto", "ref", "cpp", "triton"] = setting("auto")
    # which heads the masks average: all (every head of the mask layers, as the reference code) or the model's k
    # localisation heads, chosen once without labels from localization_images images it draws itself
    # (ospo_fast/engine/localization_heads.py)
    heads: Literal["all", "localization"] = setting("all")
    localization_heads: int = setting(3, between(1, 64))
    localization_images: int = setting(32, between(2, 4096))


@dataclass
class QuestionConfig:
    """Stage 4: K atomic yes/no questions per base prompt."""

    source: Literal["model", "rules"] = setting("model")
    temperature: float = setting(1.2, TEMPERATURE)
    top_p: float = setting(0.5, PROBABILITY)
    max_new_tokens: int = setting(256, COUNT)
    max_questions: int = setting(8, COUNT)
    batch_size: int = setting(32, COUNT)


@dataclass
class FilterConfig:
    """Stage 4: keep informative pairs. Drop if S(y_w) < tau or y_w got no yes; drop if every s_k(y_l) > 0."""

    tau: float = setting(0.6, between(0, 1))
    enabled: bool = setting(True)
    vqa_batch_size: int | Literal["auto"] = setting(16, BATCH)


@dataclass
class LossConfig:
    """Stage 5: L = L_ObjSimPO + sft_weight * L_SFT (reference code defaults)."""

    beta: float = setting(5.0, positive())
    gamma_beta_ratio: float = setting(0.5, at_least(0))
    alpha: float = setting(1.0, at_least(0))
    sft_weight: float = setting(2.0, at_least(0))
    normalization: Literal["weighted_mean", "length"] = setting("weighted_mean")
    mask_smoothing: Literal["gaussian", "binary"] = setting("gaussian")
    label_smoothing: float = setting(0.0, between(0, 0.5, hi_open=True))
    fused: bool = setting(True)  # fuse the generation head's last Linear with the loss (no full logits)
    # Guidance-aware options (beyond the paper; off by default, see BENCHMARKS.md's toy ablation):
    # guided_rewards: the whole loss under the sampling distribution softmax(u + s (c - u)), s = images.guidance_scale,
    #   u the logits after Janus's unconditional prompt (one more forward per row);
    # uncond_anchor: weight of mean_chosen (r_u - r_u_ref)^2, r_u the mean log-prob per token of the chosen image
    #   after the unconditional prompt, r_u_ref the same under the base model (LoRA adapters off), so training
    #   leaves the unconditional branch where it was.
    guided_rewards: bool = setting(False)
    uncond_anchor: float = setting(0.0, at_least(0))
    backend: Literal["auto", "ref", "cpp", "triton"] = setting("auto")


@dataclass
class TrainConfig:
    """Stage 5: optimisation (reference: LoRA r64/a128 on q,k,v,o,gate,up,down; AdamW 1e-5; cosine)."""

    lora: bool = setting(True)
    lora_r: int = setting(64, COUNT)
    lora_alpha: int = setting(128, COUNT)
    lora_dropout: float = setting(0.05, between(0, 1, hi_open=True))
    lora_targets: list[str] = setting(rule=list_of(min_length=1, choices=LORA_TARGETS, unique=True),
                                      factory=lambda: list(LORA_TARGETS))
    lr: float = setting(1e-5, positive())
    betas: list[float] = setting(rule=list_of(between(0, 1, hi_open=True), length=2), factory=lambda: [0.9, 0.95])
    weight_decay: float = setting(0.0, at_least(0))
    warmup_ratio: float = setting(0.05, between(0, 1))
    min_lr: float = setting(1e-7, Rule(">= 0 and <= train.lr", lambda v: _number(v) and v >= 0))
    max_grad_norm: float = setting(1.0, positive())
    per_device_batch: int = setting(16, COUNT)
    grad_accum: int = setting(2, COUNT)
    max_steps: int = setting(600, COUNT)
    epochs: int = setting(0, at_least(0))  # 0: run max_steps; >0: run this many passes (max_steps then caps it)
    bf16: bool = setting(True)  # bf16 autocast on the training device (CUDA or CPU)
    gradient_checkpointing: bool = setting(True)
    save_every: int = setting(100, COUNT)
    log_every: int = setting(1, COUNT)
    max_nonfinite_in_row: int = setting(10, COUNT)
    tensorboard: bool = setting(False)
    distributed: Literal["auto", "ddp", "fsdp"] = setting("auto")  # auto: DDP with LoRA, FSDP2 for full fine-tuning
    token_source: Literal["tokens", "reencode"] = setting("tokens")  # reencode: VQ-encode the saved PNGs (reference)
    # full fine-tuning only (train.lora=false): e.g. [generation_head]
    unfreeze: list[str] = setting(rule=list_of(choices=UNFREEZABLE, unique=True), factory=list)


@dataclass
class EvalConfig:
    """Judged alignment before and after training (toy world only: an exact judge exists there)."""

    toy_heldout_prompts: int = setting(64, at_least(0))  # 0: skip
    batch_size: int = setting(32, COUNT)
    # Also judge at these CFG weights (images.guidance_scale is always judged); 1.0 = the conditional model alone
    toy_extra_guidance: list[float] = setting(rule=list_of(at_least(0)), factory=list)
    # Re-tuned guidance (beyond the paper): pick, for each model judged, the weight of this list with the best loose
    # (then strict) alignment on toy_retune_prompts training-split captions, and judge held-out at it (key
    # "@retuned"); the held-out captions never choose the weight. Empty: off.
    toy_retune_guidance: list[float] = setting(rule=list_of(at_least(0), unique=True), factory=list)
    toy_retune_prompts: int = setting(64, COUNT)


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
    seed: int = setting(0, between(0, 2**63 - 1))
    iterations: int = setting(1, COUNT)


# Rules that tie two fields together: (what is wrong, in words with the values) or None.
def _cross_field_problems(c: OSPOConfig) -> list[str]:
    problems = []
    if c.prompts.source == "file" and not c.prompts.file.strip():
        problems.append("prompts.file='' but prompts.source=file; give prompts.file=PATH.jsonl or another source")
    if _number(c.train.min_lr) and _number(c.train.lr) and c.train.min_lr > c.train.lr:
        problems.append(f"train.min_lr={c.train.min_lr!r} must be <= train.lr={c.train.lr!r}")
    if _number(c.loss.uncond_anchor) and c.loss.uncond_anchor > 0 and not c.train.lora:
        problems.append(f"loss.uncond_anchor={c.loss.uncond_anchor!r} needs train.lora=true (its reference is the "
                        "base model with the adapters off); set loss.uncond_anchor=0 for full fine-tuning")
    if c.train.lora and c.train.unfreeze:
        problems.append(f"train.unfreeze={c.train.unfreeze!r} needs full fine-tuning; set train.lora=false or "
                        "train.unfreeze=[]")
    return problems


def config_problems(config: OSPOConfig) -> list[str]:
    """Every value of ``config`` that breaks its field's rule or a cross-field rule, one line each (empty: valid)."""
    problems = []
    for path, value, rule in _walk(config):
        if not rule.test(value):
            problems.append(f"{path}={value!r} must be {rule.valid}")
    return problems + _cross_field_problems(config)


def _walk(obj: Any, prefix: str = "") -> list[tuple[str, Any, Rule]]:
    """(key path, value, rule) of every leaf field under ``obj``."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _walk(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value, f.metadata["rule"]))
    return out


def check_config(config: OSPOConfig, problems: list[str] | None = None) -> OSPOConfig:
    """Raise one ConfigError listing ``problems`` (e.g. unknown keys) and every invalid value; else return config."""
    problems = list(problems or []) + config_problems(config)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))
    return config


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
    if origin in (typing.Union, types.UnionType):  # the first member that takes the value (int | Literal["auto"])
        for member in typing.get_args(annotation):
            try:
                return _check_value(path, value, member)
            except ConfigError:
                pass
        kinds = [f"one of {list(typing.get_args(m))}" if typing.get_origin(m) is Literal else f"of type {m.__name__}"
                 for m in typing.get_args(annotation)]
        raise ConfigError(f"{path}={value!r} must be " + " or ".join(kinds))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}={value!r} must be true or false")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}={value!r} must be an integer")
    if not isinstance(value, annotation):
        raise ConfigError(f"{path}={value!r} must be of type {annotation.__name__}, got {type(value).__name__}")
    return value


def _apply(obj: Any, updates: dict[str, Any], problems: list[str], prefix: str = "") -> None:
    """Set ``updates`` on ``obj`` (a config dataclass), type-checked; every bad key or type is appended to
    ``problems`` (so that all of them are reported together) and leaves that field unchanged."""
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in types_:
            problems.append(f"unknown config key {path!r}; valid keys here: {sorted(types_)}")
            continue
        annotation = types_[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                example = next(iter(_field_types(annotation)))
                problems.append(f"{path} is a section; give keys like {path}.{example}=...")
                continue
            _apply(getattr(obj, key), value, problems, prefix=f"{path}.")
            continue
        try:
            setattr(obj, key, _check_value(path, value, annotation))
        except ConfigError as err:
            problems.append(str(err))


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=2e-5"`` -> ``{"train": {"lr": 2e-05}}``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=2e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        mark = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"override {text!r}: the value {raw!r} is {mark}; quote a string, or write a list as "
                          "[a, b]") from None
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
    """Defaults, then a preset (a name from ``presets/`` or a YAML path), then ``key=value`` overrides.

    Every key, type and value is checked here, before anything runs: one ConfigError lists all problems, each as
    ``key=value must be <valid range>``."""
    config = OSPOConfig()
    problems: list[str] = []
    if preset:
        path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {preset!r} not found (looked at {path}); presets: {preset_names()} "
                              "or a path to a .yaml file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"preset {path} is not valid UTF-8 YAML{at} ({getattr(err, 'problem', None) or err}); "
                              "fix the file or pass another --preset") from None
        if not isinstance(data, dict):
            raise ConfigError(f"preset {path} must hold a mapping of sections, got {type(data).__name__}")
        _apply(config, data, problems)
    for text in overrides:
        try:
            _apply(config, parse_override(text), problems)
        except ConfigError as err:
            problems.append(str(err))
    return check_config(config, problems)


def config_to_dict(config: OSPOConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> OSPOConfig:
    """The config saved by ``save_config`` (a nested dict), checked as ``load_config`` checks."""
    config = OSPOConfig()
    problems: list[str] = []
    _apply(config, data, problems)
    return check_config(config, problems)


def config_yaml(config: OSPOConfig) -> str:
    """The resolved config as the YAML text ``save_config`` writes (and ``load_config`` reads back)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: OSPOConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    from ospo_fast.store import atomic_write_text

    return atomic_write_text(Path(path), config_yaml(config))
