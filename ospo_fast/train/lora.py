"""What trains: LoRA adapters (peft) on the language model's projections, or the whole language model; the
vision tower, VQ model and generation embeddings/aligner/head stay frozen unless named in ``train.unfreeze``.
``merge_lora`` folds a saved adapter into a standalone checkpoint directory that ``load_janus`` reads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ospo_fast.config import UNFREEZABLE, TrainConfig  # UNFREEZABLE: the modules train.unfreeze may name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_target_regex(targets: list[str]) -> str:
    """A peft ``target_modules`` regex matching ``targets`` inside the language model's decoder layers only."""
    if not targets:
        raise ValueError("train.lora_targets is empty; name the projections to adapt, e.g. [q_proj, v_proj]")
    names = "|".join(re.escape(t) for t in targets)
    return rf".*model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"


def set_trainable(model: nn.Module, config: TrainConfig) -> None:
    """Freeze everything, then unfreeze the language model (full fine-tuning) and any ``config.unfreeze``
    modules of ``model.model``. With LoRA, peft marks only the adapters trainable afterwards."""
    if config.lora and config.unfreeze:
        raise ValueError(f"train.unfreeze={config.unfreeze} needs full fine-tuning; set train.lora=false or "
                         "train.unfreeze=[]")
    for param in model.parameters():
        param.requires_grad_(False)
    if not config.lora:
        for param in model.model.language_model.parameters():
            param.requires_grad_(True)
    for name in config.unfreeze:
        if name not in UNFREEZABLE:
            raise ValueError(f"train.unfreeze entry {name!r} is not a Janus module; choose from {list(UNFREEZABLE)}")
        for param in getattr(model.model, name).parameters():
            param.requires_grad_(True)


def apply_lora(model: nn.Module, config: TrainConfig, base_path: str = ""):
    """Inject LoRA adapters into ``model`` in place (SPEC: r 64, alpha 128, dropout 0.05 on q,k,v,o,gate,up,down
    of the language model). Returns the ``PeftModel`` wrapper (for saving); ``model`` keeps working as before."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=lora_target_regex(config.lora_targets), bias="none")
    peft_model = get_peft_model(model, lora_config)  # marks only the adapters trainable
    # adapter_config.json and the checkpoint README.md (peft reads config._name_or_path) name the base model as the
    # user gave it (builtin:tiny, a hub id, a relative directory), never the resolved cache or absolute path
    peft_model.peft_config["default"].base_model_name_or_path = base_path
    if base_path:
        model.config._name_or_path = model.name_or_path = base_path
    return peft_model


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, base_path: str | None = None,
               dtype: str = "float32") -> Path:
    """Load the base model, apply the adapter saved in ``adapter_dir``, merge it into the weights and save a
    standalone checkpoint (model, processor, generation config) to ``out_dir``. ``base_path`` defaults to the
    adapter's recorded base model. ``ospo_merge.json`` records the base as given and the adapter relative to
    ``out_dir`` and, for a training checkpoint, the sha256 of its ``checksums.json`` (the chain from the merged
weights back to the checkpoint, its training state, fingerprint and metrics). Returns ``out_dir``."""
    from peft import PeftModel

    from ospo_fast.models import load_janus
    from ospo_fast.store import (
        CHECKSUM_FILE,
        atomic_write_text,
        follow_umask,
        sha256_file,
        write_directory_checksums,
    )

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    if not (config_file.is_file() and (adapter_dir / ADAPTER_WEIGHTS).is_file()):
        raise FileNotFoundError(f"{adapter_dir} holds no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); "
                                "point at a training checkpoint directory (out_dir/checkpoints/step-N) of a "
                                "train.lora=true run")
    base = base_path or json.loads(config_file.read_text()).get("base_model_name_or_path") or ""
    if not base:
        raise ValueError(f"{config_file} records no base model; pass base_path (e.g. builtin:tiny)")
    local = not base.startswith("builtin:") and (base.startswith((".", "/", "~")) or base.count("/") != 1)
    if base_path is None and local and not Path(base).expanduser().exists():
        raise ValueError(f"{config_file} records the base model {base!r} (relative to the directory the run was "
                         "started from), which does not exist from here; run from that directory or pass --base")
    bundle = load_janus(base, dtype=dtype, device="cpu")
    merged = PeftModel.from_pretrained(bundle.model, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    merged.save_pretrained(tmp)  # config, safetensors weights, generation_config.json
    bundle.processor.save_pretrained(tmp)
    record = {"base": base, "adapter": os.path.relpath(adapter_dir, out)}  # the adapter relative to the merged dir
    if (adapter_dir / CHECKSUM_FILE).is_file():  # a training checkpoint: the merged model names its content
        record["adapter_checksums_sha256"] = sha256_file(adapter_dir / CHECKSUM_FILE)
    atomic_write_text(tmp / "ospo_merge.json", json.dumps(record) + "\n")
    follow_umask(tmp)  # safetensors writes 0o600
    write_directory_checksums(tmp)  # last: load_janus checks every file of a merged model against it
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out
