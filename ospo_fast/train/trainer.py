"""Stage 5: Obj-SimPO + SFT training of Janus's image generation on preference pairs.

Each row is the chat-templated base prompt x (user turn, generation prompt) + ``<begin_of_image>`` + the image
tokens, laid out as transformers' ``JanusForConditionalGeneration.generate(generation_mode="image")`` feeds them:
text through the LM's input embeddings, image tokens through ``prepare_embeddings_for_image_generation``; the
logits of image token t come from the hidden state one position earlier through ``generation_head``. Chosen and
rejected images of P pairs form one batch of 2P rows with left-padded prompts; position ids count real tokens
only, so a row's log-probabilities do not depend on how much padding its batch needs.

``train(config, pairs_path, out_dir)`` runs single-process or under torchrun (DDP for LoRA, FSDP2 for full
fine-tuning), checkpoints atomically, resumes exactly, and merges the LoRA adapter at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ospo_fast.config import LossConfig, OSPOConfig, TrainConfig, load_config, save_config
from ospo_fast.distributed import init_distributed
from ospo_fast.engine.prompts import position_ids_from_mask
from ospo_fast.models.loader import model_identity
from ospo_fast.store import (
    atomic_write_json,
    check_fingerprint,
    check_no_symlink,
    config_fingerprint,
    directory_damage,
    directory_files,
    file_identity,
    sha256_file,
)
from ospo_fast.train import checkpoint as ckpt
from ospo_fast.train.data import BatchPlan, PairBatch, PairSet, collate, load_pair_set
from ospo_fast.train.lora import apply_lora, merge_lora, set_trainable

METRIC_KEYS = ("loss", "simpo", "sft", "chosen_reward", "rejected_reward", "margin", "accuracy")


class TrainingDivergedError(RuntimeError):
    """Too many non-finite losses in a row; the last good state is saved as a checkpoint."""


@dataclass
class TrainResult:
    """Where training left its outputs, and what happened."""

    checkpoint_dir: Path
    merged_dir: Path | None
    metrics_path: Path
    config_path: Path
    steps: int
    optimizer_steps: int
    skipped_nonfinite: int
    pairs_seen: int
    last_metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Guidance:
    """What the guidance-aware loss options need: the CFG weight s of sampling (``images.guidance_scale``), the
    ids that make Janus's unconditional prompt (``engine.image_gen.unconditional_ids``), and, for the anchor, a
    context manager under which the model is the reference (peft's ``disable_adapter``)."""

    scale: float
    pad_id: int
    bos_id: int
    boi_id: int
    reference: Callable[[], contextlib.AbstractContextManager] | None = None


class PreferenceModel(nn.Module):
    """Janus + the Obj-SimPO loss in one ``forward``, so DDP and FSDP2 see every use of the weights.

    ``check_values``: range-check targets and mask weights in every forward (host syncs); the trainer passes False
    because ``load_pair_set`` validated them once, so its steps never wait on the device for a check.
    ``guidance``: needed by ``loss.guided_rewards`` and ``loss.uncond_anchor`` (see ``LossConfig``)."""

    def __init__(self, janus: nn.Module, loss_config: LossConfig, check_values: bool = True,
                 guidance: Guidance | None = None):
        super().__init__()
        if (loss_config.guided_rewards or loss_config.uncond_anchor > 0) and guidance is None:
            raise ValueError("loss.guided_rewards / loss.uncond_anchor need the guidance scale and the unconditional "
                             "prompt's ids: pass guidance=Guidance(...)")
        if loss_config.uncond_anchor > 0 and guidance.reference is None:
            raise ValueError(f"loss.uncond_anchor={loss_config.uncond_anchor} needs a reference model: LoRA "
                             "(train.lora=true), whose disable_adapter gives the base model")
        self.janus = janus
        self.loss_config = loss_config
        self.check_values = check_values
        self.guidance = guidance

    def image_hidden(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     image_tokens: torch.Tensor) -> torch.Tensor:
        """(2P, L) prompt ids/mask + (2P, T) image tokens -> (2P, T, D) LM hidden states that predict each token."""
        janus = self.janus
        text = janus.get_input_embeddings()(prompt_ids)  # (2P, L, D)
        image = janus.prepare_embeddings_for_image_generation(image_tokens[:, :-1])  # (2P, T-1, D)
        embeds = torch.cat([text, image.to(text.dtype)], dim=1)  # (2P, L+T-1, D)
        attention = torch.cat([prompt_mask, prompt_mask.new_ones(image.shape[:2])], dim=1)  # (2P, L+T-1)
        positions = position_ids_from_mask(attention)  # left padding does not shift positions
        hidden = janus.model.language_model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                                            use_cache=False).last_hidden_state
        return hidden[:, prompt_ids.shape[1] - 1:]  # (2P, T, D): <begin_of_image> predicts token 0

    def image_logits(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     image_tokens: torch.Tensor) -> torch.Tensor:
        """(2P, T, V) generation-head logits of every image token."""
        return self.janus.model.generation_head(self.image_hidden(prompt_ids, prompt_mask, image_tokens))

    def head_input(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   image_tokens: torch.Tensor) -> torch.Tensor:
        """(2P, T, D_proj): the input of the generation head's last Linear (``vision_head``)."""
        head = self.janus.model.generation_head
        return head.activation_fn(head.proj_out(self.image_hidden(prompt_ids, prompt_mask, image_tokens)))

    def unconditional(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Janus's unconditional prompt for each row (same length and mask: pads stand in for the text)."""
        from ospo_fast.engine.image_gen import unconditional_ids

        g = self.guidance
        return unconditional_ids(prompt_ids, g.bos_id, g.boi_id, g.pad_id)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, image_tokens: torch.Tensor,
                mask_weights: torch.Tensor):
        from ospo_fast.ops.simpo_loss import fused_obj_simpo_loss, obj_simpo_loss

        config = self.loss_config
        # the generation head is logits = vision_head(x) with x = head_input: with u, c the unconditional and
        # conditional logits, u + s (c - u) = vision_head(x_u + s (x_c - x_u)), so guidance mixes the head inputs
        # and the fused op (which never materialises the logits) takes the mix as it is
        if config.fused:
            head = self.janus.model.generation_head
            x = self.head_input(prompt_ids, prompt_mask, image_tokens)  # (2P, T, D_proj)
            if config.guided_rewards:
                x_u = self.head_input(self.unconditional(prompt_ids), prompt_mask, image_tokens)
                x = x_u + self.guidance.scale * (x - x_u)
            # under autocast: bf16 `x`, float32 head weight; the fused op computes in the autocast dtype
            out = fused_obj_simpo_loss(x, head.vision_head.weight, head.vision_head.bias, image_tokens,
                                       mask_weights, config, backend=config.backend, check_values=self.check_values)
        else:
            logits = self.image_logits(prompt_ids, prompt_mask, image_tokens)  # (2P, T, V)
            if config.guided_rewards:
                u = self.image_logits(self.unconditional(prompt_ids), prompt_mask, image_tokens)
                logits = u + self.guidance.scale * (logits - u)
            out = obj_simpo_loss(logits, image_tokens, mask_weights, config, backend=config.backend,
                                 check_values=self.check_values)
        if config.uncond_anchor > 0:
            anchor = self.uncond_anchor_loss(prompt_ids, prompt_mask, image_tokens)
            out = dataclasses.replace(out, loss=out.loss + config.uncond_anchor * anchor)
        return out

    def uncond_mean_logprob(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            image_tokens: torch.Tensor) -> torch.Tensor:
        """(R,) float32: mean log-prob per image token of each row's image after the unconditional prompt."""
        from ospo_fast.ops.simpo_loss import fused_token_logprobs

        head = self.janus.model.generation_head
        x = self.head_input(self.unconditional(prompt_ids), prompt_mask, image_tokens)
        logp = fused_token_logprobs(x, head.vision_head.weight, head.vision_head.bias, image_tokens,
                                    backend=self.loss_config.backend, check_values=self.check_values)  # (R, T)
        return logp.mean(dim=1)

    def uncond_anchor_loss(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           image_tokens: torch.Tensor) -> torch.Tensor:
        """mean over the chosen rows (the first half) of (r_u - r_u_ref)^2 (``LossConfig.uncond_anchor``)."""
        p = image_tokens.shape[0] // 2
        rows = (prompt_ids[:p], prompt_mask[:p], image_tokens[:p])
        with torch.no_grad(), self.guidance.reference():
            reference = self.uncond_mean_logprob(*rows)
        return (self.uncond_mean_logprob(*rows) - reference).pow(2).mean()


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, config: TrainConfig):
    """The reference training's schedule, transformers' ``cosine_with_min_lr``: linear warm-up from 0 over
    ceil(warmup_ratio * total) optimizer steps (5%), then cosine from ``lr`` down to ``min_lr`` (1e-7)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), total,
                                                       min_lr=config.min_lr)


def total_steps(config: TrainConfig, num_pairs: int, global_batch: int) -> int:
    if config.epochs > 0:
        return min(config.max_steps, math.ceil(config.epochs * num_pairs / global_batch))
    return config.max_steps


OPERATIONAL_TRAIN_KEYS = ("save_every", "log_every", "max_nonfinite_in_row", "tensorboard", "distributed",
                          "gradient_checkpointing")  # how training runs, not what it computes: free to change on resume


FINGERPRINT_FILE = "fingerprint.json"  # in a training's out_dir: its training_fingerprint, written when it starts


def training_fingerprint(config: OSPOConfig, pairs_path: Path) -> dict:
    """``store.config_fingerprint`` of what determines the trained weights: the loss and train settings (the
    operational ones apart), the seed, the model (``models.loader.model_identity``: its content) and its dtype, and
    the pairs file."""
    train = {k: v for k, v in dataclasses.asdict(config.train).items() if k not in OPERATIONAL_TRAIN_KEYS}
    return config_fingerprint({"loss": config.loss, "train": train, "seed": config.seed,
                               "model.identity": model_identity(config.model.path), "model.dtype": config.model.dtype,
                               "pairs": file_identity(pairs_path)})


class Trainer:
    """One training run; ``train`` below is the public entry."""

    def __init__(self, config: OSPOConfig, pairs_path: Path, out_dir: Path, bundle=None):
        from ospo_fast.models import load_janus

        self.config = config
        self.tc = config.train
        self.out_dir = out_dir
        self.pairs_path = pairs_path
        self.fingerprint = training_fingerprint(config, pairs_path)
        self.dist = init_distributed(config.model.device)
        self.device = self.dist.device
        if self.tc.distributed == "fsdp" and self.tc.lora:
            raise ValueError("train.distributed=fsdp is for full fine-tuning; with train.lora=true use ddp or auto")
        self.mode = self.tc.distributed if self.tc.distributed != "auto" else ("ddp" if self.tc.lora else "fsdp")
        if bundle is None:
            bundle = load_janus(config.model.path, dtype=config.model.dtype, device=str(self.device),
                                attn_implementation=config.model.attn_implementation)
        self.bundle = bundle
        janus = bundle.model
        janus.config.use_cache = False
        set_trainable(janus, self.tc)
        torch.manual_seed(config.seed)  # the same initial adapters on every rank and in every run
        self.peft = apply_lora(janus, self.tc, base_path=config.model.path) if self.tc.lora else None
        if self.tc.gradient_checkpointing:
            janus.model.language_model.activation_checkpointing_enable(  # transformers 5's name
                activation_checkpointing_kwargs={"use_reentrant": False})
        self.pairs: PairSet = load_pair_set(pairs_path, bundle, mask_mode=config.loss.mask_smoothing,
                                            kernel=config.masks.gaussian_kernel, sigma=config.masks.gaussian_sigma,
                                            token_source=self.tc.token_source)
        self.pad_id = bundle.tokenizer.pad_token_id
        self.plan = BatchPlan(len(self.pairs), self.tc.per_device_batch, self.dist.world, self.tc.grad_accum,
                              config.seed)
        self.total = total_steps(self.tc, len(self.pairs), self.plan.global_batch)
        self.core = PreferenceModel(janus, config.loss, check_values=False,  # validated by load_pair_set
                                    guidance=self._guidance(config))
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad (check train.lora / train.lora_targets)")
        self.model = self._wrap(self.core)
        self.params = [p for p in self.core.parameters() if p.requires_grad]  # FSDP2 swaps in sharded params
        self.optimizer = torch.optim.AdamW(self.params, lr=self.tc.lr, betas=tuple(self.tc.betas),
                                           weight_decay=self.tc.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, self.total, self.tc)
        self.step = 0
        self.optimizer_steps = 0
        self.skipped = 0
        self.nonfinite_in_row = 0
        self.metrics_path = out_dir / ckpt.METRICS_FILE
        self.last_metrics: dict = {}

    # -- setup -------------------------------------------------------------------------------------------------
    def _guidance(self, config: OSPOConfig) -> Guidance:
        from ospo_fast.engine.image_gen import special_ids

        pad_id, bos_id, boi_id = special_ids(self.bundle)
        return Guidance(config.images.guidance_scale, pad_id, bos_id, boi_id,
                        reference=self.peft.disable_adapter if self.peft is not None else None)

    def _wrap(self, core: nn.Module) -> nn.Module:
        if self.dist.world <= 1:
            return core
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(core, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.dist.world,))
        for layer in core.janus.model.language_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(core, mesh=mesh)
        return core

    def _autocast(self) -> torch.autocast:
        """bf16 autocast on the training device, whatever its type: CPU runs take the very branch CUDA runs."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.tc.bf16)

    # -- checkpoints -------------------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """FSDP over several ranks: model + optimizer state are saved and loaded as DCP shards."""
        return self.mode == "fsdp" and self.dist.world > 1

    def _full_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=self.dist.world > 1)

    def save(self) -> Path:
        """Write ``checkpoints/step-N`` (all ranks call this); returns its directory."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        final = check_no_symlink(self.out_dir, ckpt.checkpoint_dir(self.out_dir, self.step))  # checkpoints/ too
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.main:
            tmp = ckpt.temp_dir_for(final)
        self.dist.barrier()
        ckpt.save_rng(tmp, self.dist.rank)
        optim_state = None
        if self.sharded:
            self._save_sharded(tmp / ckpt.SHARDED_DIR)
        else:
            optim_state = get_optimizer_state_dict(self.core, self.optimizer, options=self._full_options())
        model_state = None
        if self.peft is None:  # the whole model as save_pretrained files: what merge/eval/export load
            model_state = get_model_state_dict(self.core, options=self._full_options())
        if self.dist.main:
            if self.peft is not None:
                # adapter_model.safetensors + adapter_config.json; embeddings are never adapted, so no "auto"
                # probe of the base (peft would look base_model_name_or_path up on the hub and warn)
                self.peft.save_pretrained(str(tmp), save_embedding_layers=False)
            else:
                state = {k.removeprefix("janus."): v for k, v in model_state.items()}
                self.bundle.model.save_pretrained(str(tmp), state_dict=state)
                self.bundle.processor.save_pretrained(str(tmp))
            if optim_state is not None:
                ckpt.save_torch(optim_state, tmp / "optimizer.pt")
            ckpt.save_torch(self.scheduler.state_dict(), tmp / "scheduler.pt")
            ckpt.write_state(tmp, {"step": self.step, "optimizer_steps": self.optimizer_steps,
                                   "skipped_nonfinite": self.skipped, "nonfinite_in_row": self.nonfinite_in_row,
                                   "total_steps": self.total, "world": self.dist.world,
                                   "global_batch": self.plan.global_batch, "lora": self.tc.lora,
                                   "sharded": self.sharded,
                                   # the chain: what these weights were trained with, and every metrics line so far
                                   "fingerprint": self.fingerprint,
                                   "metrics": ckpt.metrics_digest(self.metrics_path)})
        self.dist.barrier()
        digests = self._hash_share(tmp, directory_files(tmp) if self.dist.main else None)
        if self.dist.main:
            ckpt.write_checksums(tmp, digests)
            ckpt.publish(tmp, final)
        self.dist.barrier()
        return final

    def _save_sharded(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.core, self.optimizer)  # this rank's DTensor shards
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))

    def _load_sharded(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.core, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(directory))  # each rank reads its own shards in place
        set_state_dict(self.core, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def _hash_share(self, directory: Path, names: list[str] | None) -> dict[str, str]:
        """sha256 of ``names`` (given on rank 0) with the hashing split over the ranks; the full map on rank 0."""
        if self.dist.world <= 1:
            return {name: sha256_file(directory / name) for name in names}
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
        mine = {name: sha256_file(directory / name) for name in names[self.dist.rank::self.dist.world]}
        gathered = [None] * self.dist.world
        dist.all_gather_object(gathered, mine)
        return {k: v for part in gathered for k, v in part.items()}

    def _damage(self, directory: Path) -> str | None:
        """``store.directory_damage`` with the files split over the ranks; every rank gets the same answer."""
        problem = directory_damage(directory, self.dist.rank, self.dist.world)
        if self.dist.world <= 1:
            return problem
        gathered = [None] * self.dist.world
        dist.all_gather_object(gathered, problem)
        return next((p for p in gathered if p is not None), None)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = ckpt.read_state(directory)
        if state["global_batch"] != self.plan.global_batch or state["lora"] != self.tc.lora:
            raise ckpt.CheckpointError(
                f"checkpoint {directory} was written with global batch {state['global_batch']} and "
                f"lora={state['lora']}; this run has {self.plan.global_batch} and lora={self.tc.lora}. "
                "Resume with the same config or start a new out_dir")
        if state.get("sharded", False) != self.sharded:
            raise ckpt.CheckpointError(
                f"checkpoint {directory} was written by {state['world']} process(es) "
                f"(sharded={state.get('sharded', False)}); this run has {self.dist.world}. Resume "
                "with the same number of processes")
        if self.sharded:
            self._load_sharded(directory / ckpt.SHARDED_DIR)
        elif self.peft is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.peft, load_file(str(directory / "adapter_model.safetensors")))
        else:
            weights = {}
            for file in sorted(directory.glob("model*.safetensors")):
                weights.update({f"janus.{k}": v for k, v in load_file(str(file)).items()})
            set_model_state_dict(self.core, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        if not self.sharded:
            optim_state = torch.load(directory / "optimizer.pt", weights_only=False)
            set_optimizer_state_dict(self.core, self.optimizer, optim_state,
                                     options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
        ckpt.load_rng(directory, self.dist.rank)
        self.step = state["step"]
        self.optimizer_steps = state["optimizer_steps"]
        self.skipped = state["skipped_nonfinite"]
        self.nonfinite_in_row = state["nonfinite_in_row"]

    def _truncate_metrics(self, checkpoint: Path | None) -> None:
        """Check the metric lines ``checkpoint`` vouches for and drop the ones past it (they belong to work that is
        being redone, or are a torn last line left by a kill); with no checkpoint, start the file afresh."""
        from ospo_fast.store import atomic_write_bytes, atomic_write_jsonl

        if not self.dist.main or not self.metrics_path.is_file():
            return
        recorded = ckpt.read_state(checkpoint).get("metrics") if checkpoint is not None else None
        if checkpoint is None:
            atomic_write_bytes(self.metrics_path, b"")
        elif recorded is not None:
            vouched = ckpt.check_metrics(self.metrics_path, recorded, checkpoint)
            extra = self.metrics_path.stat().st_size - len(vouched)
            if extra:
                print(f"ospo-fast: {self.metrics_path}: {extra} bytes past {checkpoint.name} dropped (steps being "
                      "redone, or an append cut off by a kill)", file=sys.stderr)
            atomic_write_bytes(self.metrics_path, vouched)
        else:  # a checkpoint from before they recorded the metrics: keep the lines up to its step
            kept = [r for r in ckpt.read_metrics(self.metrics_path) if r.get("step", 0) <= self.step]
            atomic_write_jsonl(self.metrics_path, kept)

    # -- one optimizer step ------------------------------------------------------------------------------------
    def _micro_batch(self, micro: int) -> PairBatch:
        indices = self.plan.micro_indices(self.step, micro, self.dist.rank)
        return collate(self.pairs, indices, self.pad_id).to(self.device)

    def train_step(self) -> dict:
        """Accumulate grad_accum micro-batches, clip, step (unless non-finite). Returns the step's metrics."""
        start = time.perf_counter()
        self.model.train()
        self.bundle.model.model.vqmodel.eval()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64, device=self.device)
        tokens = 0
        accum = self.tc.grad_accum
        for micro in range(accum):
            batch = self._micro_batch(micro)
            sync = micro == accum - 1 or not hasattr(self.model, "no_sync")
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self._autocast():
                out = forward_loss(self.model, batch)
            (out.loss / accum).backward()
            values = torch.stack([getattr(out, k).detach().float().mean() for k in
                                  ("loss", "simpo_loss", "sft_loss", "chosen_reward", "rejected_reward", "margin",
                                   "accuracy")])
            sums[:-1] += values.double() / accum
            sums[-1] += (~torch.isfinite(out.loss.detach())).double()  # stays on the device: no sync per micro
            tokens += batch.image_tokens.numel()
        if self.dist.world > 1:
            dist.all_reduce(sums)
            sums[:-1] /= self.dist.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        *means, nonfinite, grad_norm = torch.cat([sums, grad_norm.double().view(1)]).tolist()  # the step's one sync
        finite = nonfinite == 0 and math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
            self.optimizer_steps += 1
            self.nonfinite_in_row = 0
        else:
            self.skipped += 1
            self.nonfinite_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped step still consumes its batch and its place in the schedule
        self.step += 1
        seconds = time.perf_counter() - start
        pairs = self.plan.global_batch
        metrics = {"step": self.step, **dict(zip(METRIC_KEYS, means)),
                   "lr": lr, "grad_norm": grad_norm, "skipped": not finite, "skipped_total": self.skipped,
                   "tokens_per_s": tokens * self.dist.world / seconds, "pairs_per_s": pairs / seconds,
                   "seconds": seconds}
        return metrics

    def _stored_fingerprint(self, path: Path) -> dict | None:
        """The fingerprint the checkpoints in ``out_dir`` were trained with. Runs from before ``fingerprint.json``
        have the ``config.yaml`` of their first start: its settings, with this run's model and pairs identities
        (those it cannot tell). None when neither exists."""
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise ckpt.CheckpointError(f"{path} is damaged ({err}); it says which settings the checkpoints "
                                           f"in {self.out_dir} were trained with: restore it, or delete "
                                           f"{self.out_dir} to train again") from None
            if not isinstance(stored, dict):
                raise ckpt.CheckpointError(f"{path} holds a {type(stored).__name__}, not the settings object; "
                                           f"restore it, or delete {self.out_dir} to train again")
            return stored
        if (self.out_dir / "config.yaml").is_file():
            old = load_config(str(self.out_dir / "config.yaml"))
            old.model.path = self.config.model.path
            return training_fingerprint(old, self.pairs_path)
        return None

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        from tqdm.auto import tqdm

        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        latest = ckpt.latest_intact(self.out_dir, self._damage, say=self.dist.main) if resume else None
        fingerprint_path = self.out_dir / FINGERPRINT_FILE
        if latest is not None:  # resume only what these settings would have trained
            stored = ckpt.read_state(latest).get("fingerprint") or self._stored_fingerprint(fingerprint_path)
            check_fingerprint(stored, self.fingerprint, f"training in {self.out_dir}",
                              f"resume with the settings in {self.out_dir / 'config.yaml'}, or delete {self.out_dir} "
                              "to train again with these")
            self.load(latest)
        if self.dist.main:  # for people to read; what resumes trust is the copy in each checkpoint's state
            atomic_write_json(fingerprint_path, self.fingerprint)
        config_path = save_config(self.config, self.out_dir / "config.yaml") if self.dist.main else \
            self.out_dir / "config.yaml"
        self._truncate_metrics(latest)
        if latest is None:
            torch.manual_seed(self.config.seed + 1 + self.dist.rank)  # one LoRA-dropout stream per rank
        writer = self._tensorboard()
        bar = tqdm(total=self.total, initial=self.step, disable=not self.dist.main, desc="train", unit="step")
        last_dir = latest
        try:
            while self.step < self.total:
                metrics = self.train_step()
                self.last_metrics = metrics
                if self.dist.main:
                    self._log(metrics, writer)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
                if self.nonfinite_in_row >= self.tc.max_nonfinite_in_row:
                    last_dir = self.save()
                    raise TrainingDivergedError(
                        f"{self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_in_row="
                        f"{self.tc.max_nonfinite_in_row}) at step {self.step}; the last good weights are saved in "
                        f"{last_dir}. Lower train.lr, check the pairs file for bad tokens, or use float32")
                if self.step % self.tc.save_every == 0 or self.step == self.total:
                    last_dir = self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if last_dir is None:  # resumed at the end already
            last_dir = self.save()
        merged = None
        if self.peft is not None:
            merged = check_no_symlink(self.out_dir, self.out_dir / "merged")
            if self.dist.main:
                merge_lora(last_dir, merged, base_path=self.config.model.path, dtype=self.config.model.dtype)
            self.dist.barrier()
        return TrainResult(checkpoint_dir=last_dir, merged_dir=merged, metrics_path=self.metrics_path,
                           config_path=config_path, steps=self.step, optimizer_steps=self.optimizer_steps,
                           skipped_nonfinite=self.skipped, pairs_seen=self.step * self.plan.global_batch,
                           last_metrics=self.last_metrics)

    def _tensorboard(self):
        if not (self.tc.tensorboard and self.dist.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("train.tensorboard=true needs the tensorboard package (pip install tensorboard) "
                              "or set train.tensorboard=false") from err
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _log(self, metrics: dict, writer) -> None:
        if self.step % self.tc.log_every == 0 or metrics["skipped"] or self.step == self.total:
            ckpt.append_line(self.metrics_path, json.dumps(metrics))
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, float):
                    writer.add_scalar(f"train/{key}", value, self.step)


def forward_loss(model: nn.Module, batch: PairBatch):
    """One micro-batch through ``PreferenceModel`` (possibly DDP/FSDP-wrapped) -> PreferenceLossOutput."""
    return model(batch.prompt_ids, batch.prompt_mask, batch.image_tokens, batch.mask_weights)


def train(config: OSPOConfig, pairs_path: str | Path, out_dir: str | Path, resume: bool = True,
          bundle=None) -> TrainResult:
    """Train on the pairs in ``pairs_path`` (JSONL), writing checkpoints, ``metrics.jsonl`` and ``config.yaml``
    to ``out_dir``. ``resume``: continue from the latest complete checkpoint there. ``bundle``: an already
    loaded ``JanusBundle`` to train in place (else ``config.model`` is loaded). Under torchrun, every rank calls
    this; rank 0 writes the files. Raises ``PairsFileError`` for a bad pairs file and
    ``TrainingDivergedError`` after ``train.max_nonfinite_in_row`` non-finite steps in a row."""
    trainer = Trainer(config, Path(pairs_path), Path(out_dir), bundle=bundle)
    try:
        return trainer.run(resume)
    finally:
        trainer.dist.close()
