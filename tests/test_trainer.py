"""Stage 5 trainer on builtin:tiny with hand-made pair sets (random token sequences with masks)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers

import ospo_fast
from ospo_fast.config import LossConfig, OSPOConfig
from ospo_fast.models import load_janus

PROMPTS = ["a red car and a blue bench", "two dogs", "a cat on the left of a green chair", "a white harp"]


# -- helpers -------------------------------------------------------------------------------------------------------
def write_pairs(path: Path, num: int, grid: int = 8, codebook: int = 256, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(num):
        sides = {}
        for side in ("chosen", "rejected"):
            tokens = torch.randint(0, codebook, (grid * grid,), generator=generator).tolist()
            mask = (torch.rand(grid * grid, generator=generator) < 0.3).int().tolist()
            sides[side] = {"tokens": tokens, "mask": mask, "image": f"images/{i}_{side}.png", "score": 0.5}
        lines.append(json.dumps({"pair_id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "category": "color",
                                 "grid": grid, **sides}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(**train) -> OSPOConfig:
    config = OSPOConfig()
    config.model.device = "cpu"
    defaults = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["q_proj", "v_proj", "down_proj"],
                    per_device_batch=2, grad_accum=1, max_steps=4, lr=1e-2, save_every=100,
                    gradient_checkpointing=False, warmup_ratio=0.05)
    for key, value in {**defaults, **train}.items():
        setattr(config.train, key, value)
    return config


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine run several times faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_tiny():
    return load_janus("builtin:tiny", device="cpu")


# -- conditioning: our teacher-forced logits equal transformers' own generate() step scores ---------------------------
class _Recorder:
    """A logits processor that records the raw generation-head scores of each decode step (before CFG)."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def test_image_logits_match_transformers_generate(tiny_bundle):
    from transformers import LogitsProcessorList

    from ospo_fast.train.data import PairSet, collate, prompt_token_ids
    from ospo_fast.train.trainer import PreferenceModel

    model, processor = tiny_bundle.model, tiny_bundle.processor
    prompts = [PROMPTS[2], PROMPTS[1]]  # different lengths: the short one is left-padded in our batch
    tokens, expected = [], []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt_token_ids(processor, prompt)])
        recorder = _Recorder()
        torch.manual_seed(i)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                             logits_processor=LogitsProcessorList([recorder]))
        tokens.append(out[0])
        expected.append(torch.stack([s[0] for s in recorder.scores]))  # conditional row, (T, V)
    pairs = PairSet(pair_ids=["a"], prompt_ids=[torch.tensor(prompt_token_ids(processor, p)) for p in prompts],
                    tokens=torch.stack(tokens).view(1, 2, -1), masks=torch.zeros(1, 2, 64), grid=8)
    batch = _two_prompt_batch(pairs, tiny_bundle.tokenizer.pad_token_id, collate)
    with torch.no_grad():
        logits = PreferenceModel(model, LossConfig()).image_logits(batch.prompt_ids, batch.prompt_mask,
                                                                   batch.image_tokens)  # (2, T, V)
    assert batch.prompt_mask[1].sum() < batch.prompt_mask.shape[1]  # row 1 really is padded
    for row in range(2):
        torch.testing.assert_close(logits[row], expected[row], atol=1e-4, rtol=1e-4)


def _two_prompt_batch(pairs, pad_id, collate):
    """One 'pair' whose chosen and rejected rows use different prompts (to exercise left padding)."""
    batch = collate(pairs, torch.tensor([0]), pad_id)
    long_ids, short_ids = pairs.prompt_ids
    length = long_ids.numel()
    batch.prompt_ids[:] = pad_id
    batch.prompt_mask[:] = 0
    batch.prompt_ids[0, :] = long_ids
    batch.prompt_mask[0, :] = 1
    batch.prompt_ids[1, length - short_ids.numel():] = short_ids
    batch.prompt_mask[1, length - short_ids.numel():] = 1
    return batch


@pytest.mark.parametrize("mode", ["gaussian", "binary"])
def test_pair_set_masks_and_layout(tiny_bundle, tmp_path, mode):
    from ospo_fast.ops.object_masks import soft_mask
    from ospo_fast.train.data import collate, load_pair_set

    path = write_pairs(tmp_path / "pairs.jsonl", 5)
    pairs = load_pair_set(path, tiny_bundle, mask_mode=mode)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    binary = torch.tensor([r["rejected"]["mask"] for r in records], dtype=torch.float32).view(5, 8, 8)
    expected = soft_mask(binary).flatten(1) if mode == "gaussian" else binary.flatten(1)
    torch.testing.assert_close(pairs.masks[:, 1], expected)
    batch = collate(pairs, torch.tensor([3, 1, 4]), tiny_bundle.tokenizer.pad_token_id)
    assert batch.image_tokens.shape == (6, 64)
    assert batch.image_tokens[0].tolist() == records[3]["chosen"]["tokens"]
    assert batch.image_tokens[3].tolist() == records[3]["rejected"]["tokens"]
    boi = tiny_bundle.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    assert (batch.prompt_ids[:, -1] == boi).all()  # left padding: every row ends in <begin_of_image>


def test_batch_plan_shards_match_one_process():
    from ospo_fast.train.data import BatchPlan

    one = BatchPlan(num_pairs=7, per_device=4, world=1, accum=2, seed=3)
    two = BatchPlan(num_pairs=7, per_device=2, world=2, accum=2, seed=3)
    for step in range(5):
        for micro in range(2):
            joined = torch.cat([two.micro_indices(step, micro, r) for r in range(2)])
            assert joined.tolist() == one.micro_indices(step, micro, 0).tolist()
    seen = torch.cat([one.step_indices(0), one.step_indices(1)])[:7]
    assert sorted(seen.tolist()) == list(range(7))  # an epoch visits every pair once


def test_lr_schedule_is_the_spec():
    """SPEC.md: cosine with 5% warm-up to 1e-7 (transformers' cosine_with_min_lr, as the reference training used),
    written out here: linear warm-up from 0 over ceil(5% of the steps), then lr_min + (lr - lr_min) (1 + cos)/2."""
    from ospo_fast.config import TrainConfig
    from ospo_fast.train.trainer import lr_schedule

    config, total = TrainConfig(), 37
    assert (config.lr, config.warmup_ratio, config.min_lr) == (1e-5, 0.05, 1e-7)
    warmup = math.ceil(0.05 * total)  # 2 steps
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = lr_schedule(opt, total, config)
    for step in range(total + 1):
        if step < warmup:
            spec = 1e-5 * step / warmup
        else:
            spec = 1e-7 + (1e-5 - 1e-7) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert math.isclose(sched.get_last_lr()[0], spec, rel_tol=1e-9, abs_tol=1e-15), step
        opt.step()
        sched.step()
    assert math.isclose(spec, 1e-7)  # ends on the floor


# -- bf16 autocast and host syncs: the CUDA branch, run on the CPU -------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"guided_rewards": True, "uncond_anchor": 1.0}])
def test_bf16_step_runs_under_autocast_on_cpu(tmp_path, fresh_tiny, options):
    """train.bf16 (the default) with float32 weights enters torch.autocast on the training device, CPU included:
    the fused head then gets bf16 activations and a float32 weight (what crashed on CUDA). The step's loss is the
    loss under torch.autocast("cpu", bf16), not the float32 one, and the step is taken; likewise with the
    guidance-aware options (a second, unconditional forward; the reference under peft's disable_adapter)."""
    from ospo_fast.train.trainer import Trainer, forward_loss

    config = tiny_config(bf16=True)
    for key, value in options.items():
        setattr(config.loss, key, value)
    assert config.loss.fused and config.model.dtype == "float32"
    trainer = Trainer(config, write_pairs(tmp_path / "pairs.jsonl", 4), tmp_path / "out", bundle=fresh_tiny)
    batch = trainer._micro_batch(0)
    trainer.model.train()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = forward_loss(trainer.model, batch).loss.item()
        fp32 = forward_loss(trainer.model, batch).loss.item()
    metrics = trainer.train_step()
    assert abs(bf16 - fp32) > 1e-4  # the two differ measurably ...
    assert metrics["loss"] == pytest.approx(bf16, abs=1e-6)  # ... and the step ran the bf16 one
    assert not metrics["skipped"] and math.isfinite(metrics["grad_norm"])


class _SyncRecorder:
    """Records where host reads of tensors come from: aten._local_scalar_dense (.item(), bool(), int(), float()) via
    a TorchDispatchMode, and Tensor.tolist. Each read is attributed to the innermost frame in ospo_fast/ or in
    transformers/ that caused it."""

    def __init__(self, monkeypatch):
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        self.origins: list[str] = []
        record = self._record
        original = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: record(traceback.extract_stack()) or original(t))

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    record(traceback.extract_stack())
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def _record(self, stack) -> None:
        for frame in reversed(stack[:-1]):
            path = os.path.realpath(frame.filename)
            for name, root in _ORIGIN_ROOTS.items():  # by the packages' real folders, not by a path's words: a
                if path.startswith(root + os.sep):  # checkout or venv under a folder named ospo_fast is not ours
                    self.origins.append(name + "/" + os.path.relpath(path, root).replace(os.sep, "/"))
                    return
        self.origins.append("other")


def _package_root(module) -> str:
    return os.path.realpath(os.path.dirname(module.__file__))


_ORIGIN_ROOTS = {"ospo_fast": _package_root(ospo_fast), "transformers": _package_root(transformers),
                 "torch/optim": _package_root(torch.optim)}
MASKING = "transformers/masking_utils.py"


def test_sync_origins_go_by_package_folders_not_path_words(monkeypatch):
    """A checkout cloned into a folder named ospo_fast puts its venv's torch under .../ospo_fast/.venv/...: such a
    frame is not ours (it used to be, and test_training_step_syncs_once failed in that folder)."""
    import traceback

    recorder = _SyncRecorder(monkeypatch)
    cloned = "/home/user/ospo_fast/.venv/lib/python3.11/site-packages/torch/nn/functional.py"
    ours = os.path.join(_ORIGIN_ROOTS["ospo_fast"], "train", "trainer.py")
    recorder._record([traceback.FrameSummary(cloned, 1, "f"), None])
    recorder._record([traceback.FrameSummary(ours, 1, "g"), traceback.FrameSummary(cloned, 1, "f"), None])
    assert recorder.origins == ["other", "ospo_fast/train/trainer.py"]


def test_training_step_syncs_once(tmp_path, fresh_tiny, monkeypatch):
    """No host sync in a micro-step's forward + backward from our code (targets and masks were validated when
    the pairs were loaded); the optimizer step reads its metrics back once, whatever grad_accum is. Left: the one
    or two reads transformers' sdpa mask does per forward (is the padding mask all ones? the second only when the
    first is), counted here so that any new one fails the test."""
    from ospo_fast.train.trainer import Trainer, forward_loss

    trainer = Trainer(tiny_config(grad_accum=2), write_pairs(tmp_path / "pairs.jsonl", 8), tmp_path / "out",
                      bundle=fresh_tiny)
    batch = trainer._micro_batch(0)
    recorder = _SyncRecorder(monkeypatch)
    with recorder.mode:
        with trainer._autocast():
            out = forward_loss(trainer.model, batch)
        out.loss.backward()
    assert set(recorder.origins) == {MASKING} and 1 <= len(recorder.origins) <= 2
    recorder.origins.clear()
    with recorder.mode:
        trainer.train_step()
    ours = [o for o in recorder.origins if o.startswith("ospo_fast/") and o != "ospo_fast/train/data.py"]
    assert ours == ["ospo_fast/train/trainer.py"]  # the one read-back of the step's metrics
    assert 2 <= recorder.origins.count(MASKING) <= 2 * 2  # two micro-batches


# -- training behaviour -------------------------------------------------------------------------------------------
def evaluate(bundle, pairs_path: Path) -> tuple[float, float]:
    """(accuracy, mean margin) of the preference on every pair in the file, without dropout."""
    from ospo_fast.train.data import collate, load_pair_set
    from ospo_fast.train.trainer import PreferenceModel

    pairs = load_pair_set(pairs_path, bundle)
    batch = collate(pairs, torch.arange(len(pairs)), bundle.tokenizer.pad_token_id)
    model = PreferenceModel(bundle.model, LossConfig()).eval()
    with torch.no_grad():
        out = model(batch.prompt_ids, batch.prompt_mask, batch.image_tokens, batch.mask_weights)
    return out.accuracy.float().mean().item(), out.margin.float().mean().item()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A few dozen LoRA steps on 6 random pairs, on a private copy of the tiny model."""
    tmp = tmp_path_factory.mktemp("lora_run")
    pairs = write_pairs(tmp / "pairs.jsonl", 6, seed=2)
    bundle = load_janus("builtin:tiny", device="cpu")
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    eval_before = evaluate(bundle, pairs)
    config = tiny_config(max_steps=30, save_every=15, lr=1e-2)
    config.loss.fused = False  # the fused path is checked against this one below
    from ospo_fast.train import train

    result = train(config, pairs, tmp / "out", bundle=bundle)
    return result, bundle, before, pairs, eval_before, evaluate(bundle, pairs)


def test_training_raises_accuracy_and_margin(lora_run):
    result, _, _, _, (acc_before, margin_before), (acc_after, margin_after) = lora_run
    metrics = read_metrics(result.metrics_path)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for key in ("loss", "simpo", "sft", "chosen_reward", "rejected_reward", "margin", "accuracy", "lr",
                "grad_norm", "tokens_per_s", "pairs_per_s", "skipped"):
        assert key in metrics[0]
    assert acc_before < 1.0 and acc_after == 1.0
    assert margin_after > margin_before + 0.1
    assert sum(m["loss"] for m in metrics[-5:]) < sum(m["loss"] for m in metrics[:5])
    assert result.steps == 30 and result.optimizer_steps == 30 and result.skipped_nonfinite == 0
    assert result.config_path.is_file()
    assert (result.checkpoint_dir.parent / "step-000015").is_dir()


def test_lora_params_change_and_frozen_do_not(lora_run):
    _, bundle, before, *_ = lora_run
    after = dict(bundle.model.named_parameters())
    lora = [n for n in after if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert all(after[n].abs().sum() > 0 for n in lora if "lora_B" in n)  # B starts at zero
    for name, param in after.items():
        if "lora_" in name:
            assert param.requires_grad
            continue
        assert not param.requires_grad, name
        key = name.replace(".base_layer", "")
        assert torch.equal(param, before[key]), f"frozen parameter {name} changed"


def test_merged_checkpoint_reloads_and_generates(lora_run):
    result, bundle, _, pairs_path, *_ = lora_run
    from ospo_fast.train.data import PairSet, collate, load_pair_set, prompt_token_ids
    from ospo_fast.train.trainer import PreferenceModel

    merged = load_janus(str(result.merged_dir), device="cpu")
    pairs: PairSet = load_pair_set(pairs_path, merged)
    batch = collate(pairs, torch.arange(4), merged.tokenizer.pad_token_id)
    with torch.no_grad():
        trained = PreferenceModel(bundle.model, LossConfig()).image_logits(
            batch.prompt_ids, batch.prompt_mask, batch.image_tokens)
        reloaded = PreferenceModel(merged.model, LossConfig()).image_logits(
            batch.prompt_ids, batch.prompt_mask, batch.image_tokens)
    torch.testing.assert_close(reloaded, trained, atol=1e-4, rtol=1e-4)
    ids = torch.tensor([prompt_token_ids(merged.processor, PROMPTS[0])])
    tokens = merged.model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image")
    assert tokens.shape == (1, 64)
    image = merged.model.decode_image_tokens(tokens)
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-4)])
def test_fused_and_naive_paths_agree_with_gradients(tiny_bundle, tmp_path, dtype, atol, rtol):
    from ospo_fast.train.data import collate, load_pair_set
    from ospo_fast.train.trainer import PreferenceModel

    pairs = load_pair_set(write_pairs(tmp_path / "pairs.jsonl", 3, seed=5), tiny_bundle)
    batch = collate(pairs, torch.tensor([2, 0, 1]), tiny_bundle.tokenizer.pad_token_id)  # odd P=3
    weight = tiny_bundle.model.model.generation_head.proj_out.weight
    results = []
    for fused in (False, True):
        out = PreferenceModel(tiny_bundle.model, LossConfig(fused=fused))(
            batch.prompt_ids, batch.prompt_mask, batch.image_tokens, batch.mask_weights)
        (grad,) = torch.autograd.grad(out.loss, [weight])
        results.append((out.loss.detach(), grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=atol, rtol=rtol)
    torch.testing.assert_close(results[1][1], results[0][1], atol=atol, rtol=rtol)


# -- resume ------------------------------------------------------------------------------------------------------
class _Crash(RuntimeError):
    pass


def test_resume_after_crash_equals_uninterrupted(tmp_path, monkeypatch):
    from ospo_fast.train import train, trainer

    pairs = write_pairs(tmp_path / "pairs.jsonl", 3, seed=1)
    config = tiny_config(max_steps=6, save_every=2, grad_accum=2, per_device_batch=1, lora_dropout=0.1,
                         gradient_checkpointing=True)
    full = train(config, pairs, tmp_path / "full")

    calls = {"n": 0}
    original = trainer.forward_loss

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 5 - 1:  # first micro-batch of step 5 (checkpoint at step 4)
            raise _Crash("simulated crash")
        return original(model, batch)

    monkeypatch.setattr(trainer, "forward_loss", crashing)
    with pytest.raises(_Crash):
        train(config, pairs, tmp_path / "resumed")
    monkeypatch.setattr(trainer, "forward_loss", original)
    assert len(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == 4
    resumed = train(config, pairs, tmp_path / "resumed", resume=True)

    a, b = read_metrics(full.metrics_path), read_metrics(resumed.metrics_path)
    assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(1, 7))
    for key in ("loss", "margin", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b]), torch.tensor([m[key] for m in a]),
                                   atol=1e-6, rtol=1e-5)
    wa, wb = adapter_weights(full.checkpoint_dir), adapter_weights(resumed.checkpoint_dir)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=1e-5)


def test_resume_refuses_other_settings_and_accepts_operational_ones(tmp_path):
    """A finished (or killed) training resumed with other loss or train settings would report the new settings on
    the old weights: it is refused, naming the key and the fix. Operational settings (save_every) may change."""
    from ospo_fast.store import FingerprintMismatch
    from ospo_fast.train import train

    pairs = write_pairs(tmp_path / "pairs.jsonl", 3, seed=1)
    config = tiny_config(max_steps=2, save_every=1)
    first = train(config, pairs, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "fingerprint.json").read_text())
    assert stored["loss.beta"] == config.loss.beta and "train.save_every" not in stored
    changed = tiny_config(max_steps=2, save_every=1)
    changed.loss.uncond_anchor = 10.0
    with pytest.raises(FingerprintMismatch, match=r"loss.uncond_anchor: 0.0 -> 10.0.*delete"):
        train(changed, pairs, tmp_path / "run", resume=True)
    longer = tiny_config(max_steps=3, save_every=1)
    with pytest.raises(FingerprintMismatch, match="train.max_steps: 2 -> 3"):
        train(longer, pairs, tmp_path / "run", resume=True)
    again = train(tiny_config(max_steps=2, save_every=5), pairs, tmp_path / "run", resume=True)
    assert read_metrics(again.metrics_path) == read_metrics(first.metrics_path)
    # Was: with fingerprint.json and config.yaml deleted, a resume with another lr went through. What a resume
    # trusts is the copy of the fingerprint inside each checkpoint's trainer_state.json (under its checksums.json);
    # fingerprint.json is only the readable copy, rewritten when damaged.
    fingerprint = (tmp_path / "run" / "fingerprint.json")
    saved = fingerprint.read_bytes()
    (tmp_path / "run" / "config.yaml").unlink()
    for garbage in (b"{not json", b"[1, 2]", b"\xff\xfe", None):
        fingerprint.unlink() if garbage is None else fingerprint.write_bytes(garbage)
        with pytest.raises(FingerprintMismatch, match="loss.uncond_anchor: 0.0 -> 10.0"):
            train(changed, pairs, tmp_path / "run", resume=True)
    train(config, pairs, tmp_path / "run", resume=True)
    assert fingerprint.read_bytes() == saved
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["fingerprint"] == stored


def test_metrics_of_finished_steps_are_held_to_what_the_checkpoint_recorded(tmp_path):
    """Was: an edited loss, a deleted middle line or a mid-file cut in metrics.jsonl went into the run summary.
    Each checkpoint records the length and sha256 of metrics.jsonl; resume and every reader hold the file to it."""
    from ospo_fast.run import loss_summary
    from ospo_fast.train import CheckpointError, train
    from ospo_fast.train.checkpoint import read_vouched_metrics

    pairs = write_pairs(tmp_path / "pairs.jsonl", 3, seed=1)
    config = tiny_config(max_steps=3, save_every=1)
    result = train(config, pairs, tmp_path / "run")
    metrics = result.metrics_path
    good = metrics.read_bytes()
    assert read_vouched_metrics(tmp_path / "run") == read_metrics(metrics) and len(read_metrics(metrics)) == 3
    lines = good.decode().splitlines(keepends=True)
    edited = good.replace(b'"loss": ', b'"loss": 1', 1)
    for damaged in (edited, (lines[0] + lines[2]).encode(), good[: len(good) // 2]):
        metrics.write_bytes(damaged)
        for read in (lambda: read_vouched_metrics(tmp_path / "run"), lambda: loss_summary(metrics),
                     lambda: train(config, pairs, tmp_path / "run", resume=True)):
            with pytest.raises(CheckpointError, match=r"metrics\.jsonl is not what step-000003 recorded of it"):
                read()
    metrics.write_bytes(good + b'{"step": 4, "loss": 0.5}\n{"step"')  # lines after the last checkpoint, torn
    assert read_vouched_metrics(tmp_path / "run") == [json.loads(line) for line in lines]
    train(config, pairs, tmp_path / "run", resume=True)  # resumed at the end: the lines past it are dropped
    assert metrics.read_bytes() == good


# -- non-finite losses and bad input ------------------------------------------------------------------------------
def _nan_after(original, bad_calls):
    calls = {"n": 0}

    def patched(model, batch):
        calls["n"] += 1
        out = original(model, batch)
        if calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    return patched


def test_nonfinite_step_is_skipped(tmp_path, monkeypatch, fresh_tiny):
    from ospo_fast.train import train, trainer

    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    monkeypatch.setattr(trainer, "forward_loss", _nan_after(trainer.forward_loss, {2}))
    result = train(tiny_config(max_steps=3), pairs, tmp_path / "out", bundle=fresh_tiny)
    metrics = read_metrics(result.metrics_path)
    assert [m["skipped"] for m in metrics] == [False, True, False]
    assert result.skipped_nonfinite == 1 and result.optimizer_steps == 2
    assert all(math.isfinite(v) for v in (w.abs().sum().item() for w in adapter_weights(result.checkpoint_dir)
                                          .values()))


def test_nonfinite_in_a_row_stops_with_checkpoint(tmp_path, monkeypatch, fresh_tiny):
    from ospo_fast.train import TrainingDivergedError, train, trainer
    from ospo_fast.train.checkpoint import latest_checkpoint, read_state

    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    monkeypatch.setattr(trainer, "forward_loss", _nan_after(trainer.forward_loss, {2, 3, 4, 5}))
    config = tiny_config(max_steps=10, max_nonfinite_in_row=3)
    with pytest.raises(TrainingDivergedError, match="non-finite losses in a row"):
        train(config, pairs, tmp_path / "out", bundle=fresh_tiny)
    last = latest_checkpoint(tmp_path / "out")
    assert last is not None and read_state(last)["step"] == 4 and read_state(last)["optimizer_steps"] == 1
    assert all(torch.isfinite(w).all() for w in adapter_weights(last).values())


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("{not json\n", "not valid JSON"),
    ('{"pair_id": "a", "prompt": "x", "grid": 8, "chosen": {"tokens": [1, 2], "mask": [0, 1]}, '
     '"rejected": {"tokens": [1], "mask": [0]}}\n', "grid\\*grid=64"),
    ('{"pair_id": "a", "prompt": "x"}\n', "missing key 'grid'"),
    ("\n", "holds no pairs"),
    (json.dumps({"pair_id": "a", "prompt": "x", "grid": 1, "chosen": {"tokens": [1], "mask": [0.5]},
                 "rejected": {"tokens": [1], "mask": [1]}}) + "\n", "chosen.mask must hold 0 or 1"),
    (json.dumps({"pair_id": "a", "prompt": "x", "grid": 1, "chosen": {"tokens": [1], "mask": [1]},
                 "rejected": {"tokens": [1.5], "mask": [1]}}) + "\n", "rejected.tokens must be integer"),
])
def test_bad_pairs_file_errors(tmp_path, content, match):
    from ospo_fast.train import PairsFileError, read_pairs

    path = tmp_path / "pairs.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PairsFileError, match=match):
        read_pairs(path)


def test_pairs_from_another_model_are_rejected(tmp_path, tiny_bundle):
    from ospo_fast.train import PairsFileError, load_pair_set

    with pytest.raises(PairsFileError, match="model's image grid is 8"):
        load_pair_set(write_pairs(tmp_path / "p.jsonl", 2, grid=24), tiny_bundle)
    with pytest.raises(PairsFileError, match="outside the codebook"):
        load_pair_set(write_pairs(tmp_path / "q.jsonl", 2, codebook=5000), tiny_bundle)


def test_reencode_reads_pngs_with_vq_encoder(tmp_path, tiny_bundle):
    import numpy as np
    from PIL import Image

    from ospo_fast.train.data import load_pair_set

    path = write_pairs(tmp_path / "pairs.jsonl", 2)
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    pixels = {}
    for record in map(json.loads, path.read_text().splitlines()):
        for side in ("chosen", "rejected"):
            array = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / record[side]["image"])
            pixels[record[side]["image"]] = array
    pairs = load_pair_set(path, tiny_bundle, token_source="reencode")
    first = next(iter(pixels.values()))
    x = torch.from_numpy(first).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = tiny_bundle.model.model.vqmodel.encode(x).image_tokens.view(-1)
    assert pairs.tokens[0, 0].tolist() == expected.tolist()


def test_full_finetune_saves_loadable_model(tmp_path, fresh_tiny):
    from ospo_fast.train import train

    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    vision_before = fresh_tiny.model.model.vision_model.embeddings.patch_embedding.weight.clone()
    layer_before = fresh_tiny.model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    result = train(tiny_config(lora=False, max_steps=2, lr=1e-3), pairs, tmp_path / "out", bundle=fresh_tiny)
    assert result.merged_dir is None
    reloaded = load_janus(str(result.checkpoint_dir), device="cpu").model
    up = reloaded.model.language_model.layers[0].mlp.up_proj.weight
    assert not torch.equal(up, layer_before)
    torch.testing.assert_close(up, fresh_tiny.model.model.language_model.layers[0].mlp.up_proj.weight)
    assert torch.equal(reloaded.model.vision_model.embeddings.patch_embedding.weight, vision_before)


def test_cli_train_and_merge_lora(tmp_path, capsys):
    from ospo_fast.cli import main

    assert main(["train", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x"),
                 "--preset", "tiny"]) == 2
    assert "does not exist" in capsys.readouterr().err
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    out = tmp_path / "out"
    assert main(["train", "--pairs", str(pairs), "--out", str(out), "--preset", "tiny", "model.device=cpu",
                 "train.max_steps=2", "train.per_device_batch=2", "train.lora_targets=[q_proj]"]) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 2 and (out / "merged" / "config.json").is_file()
    assert main(["merge-lora", str(out / "checkpoints" / "step-000002"), str(tmp_path / "merged2")]) == 0
    a = load_janus(str(out / "merged"), device="cpu").model.model.language_model.layers[0].self_attn.q_proj.weight
    b = load_janus(str(tmp_path / "merged2"), device="cpu").model.model.language_model.layers[0].self_attn.q_proj
    torch.testing.assert_close(b.weight, a)


# -- checkpoint integrity: a damaged newest checkpoint is skipped, never loaded -----------------------------------
def _integrity_config() -> OSPOConfig:
    return tiny_config(max_steps=4, save_every=1, per_device_batch=1, lora_dropout=0.1)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An uninterrupted 4-step run, and the same run killed in step 4 (checkpoints at steps 1, 2, 3)."""
    from ospo_fast.train import train, trainer

    root = tmp_path_factory.mktemp("integrity")
    pairs = write_pairs(root / "pairs.jsonl", 3, seed=2)
    full = train(_integrity_config(), pairs, root / "full")
    original, calls = trainer.forward_loss, {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Crash("simulated kill in step 4")
        return original(model, batch)

    trainer.forward_loss = crashing
    try:
        with pytest.raises(_Crash):
            train(_integrity_config(), pairs, root / "killed")
    finally:
        trainer.forward_loss = original
    return pairs, full, root / "killed"


def _copy_run(killed: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(killed, tmp_path / "run"))


def _flip_bytes(path: Path) -> None:
    """Overwrite 64 bytes past the safetensors header (its 8-byte length + JSON stay intact)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:start + 64] = bytes([0x7F] * 64)  # float32 0x7f7f7f7f ~ 3.4e38
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_curve(a_path: Path, b_path: Path) -> None:
    a, b = read_metrics(a_path), read_metrics(b_path)
    assert [m["step"] for m in b] == [m["step"] for m in a] == [1, 2, 3, 4]
    for key in ("loss", "margin", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b]), torch.tensor([m[key] for m in a]),
                                   atol=1e-6, rtol=1e-5)


def test_checkpoints_list_the_sha256_of_every_file(interrupted):
    import hashlib

    from ospo_fast.train.checkpoint import CHECKSUM_FILE, list_checkpoints

    _, full, killed = interrupted
    assert [p.name for p in list_checkpoints(killed)] == ["step-000001", "step-000002", "step-000003"]
    directory = full.checkpoint_dir
    listed = json.loads((directory / CHECKSUM_FILE).read_text())["sha256"]
    files = sorted(p.name for p in directory.iterdir() if p.name != CHECKSUM_FILE)
    assert sorted(listed) == files and "adapter_model.safetensors" in files and "trainer_state.json" in files
    for name, digest in listed.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("damage,file", [
    (_flip_bytes, "adapter_model.safetensors"),  # garbage weights that would load without an error
    (_truncate, "adapter_model.safetensors"),
    (_truncate, "trainer_state.json"),
    (lambda p: p.unlink(), "trainer_state.json"),
    (lambda p: p.unlink(), "checksums.json"),
], ids=["flipped-adapter", "truncated-adapter", "truncated-state", "no-state", "no-checksums"])
def test_damaged_newest_checkpoint_is_skipped(interrupted, tmp_path, capsys, damage, file):
    from ospo_fast.train import train

    pairs, full, killed = interrupted
    run = _copy_run(killed, tmp_path)
    damage(run / "checkpoints" / "step-000003" / file)
    resumed = train(_integrity_config(), pairs, run)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {run / 'checkpoints' / 'step-000003'}: {file}" in err
    assert "resuming from step-000002" in err
    _same_curve(full.metrics_path, resumed.metrics_path)
    for name, weight in adapter_weights(full.checkpoint_dir).items():
        torch.testing.assert_close(adapter_weights(resumed.checkpoint_dir)[name], weight, atol=1e-6, rtol=1e-5)


def test_every_checkpoint_damaged_is_an_error_naming_each(interrupted, tmp_path, capsys):
    from ospo_fast.train import train
    from ospo_fast.train.checkpoint import CheckpointError

    pairs, _, killed = interrupted
    run = _copy_run(killed, tmp_path)
    for step in (1, 2, 3):
        _flip_bytes(run / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step-000003: adapter_model.safetensors does "
                                              r"not match .*step-000001: adapter_model.safetensors"):
        train(_integrity_config(), pairs, run)
    from ospo_fast.cli import main

    assert main(["train", "--pairs", str(pairs), "--out", str(run), "--preset", "tiny", "model.device=cpu",
                 "train.max_steps=4", "train.per_device_batch=1", "train.lora_r=4", "train.lora_alpha=8",
                 "train.lora_targets=[q_proj,v_proj,down_proj]"]) == 2  # one line, no traceback
    assert "ospo-fast: error: no intact checkpoint" in capsys.readouterr().err


def test_torn_last_metrics_line_is_dropped_with_a_message(interrupted, tmp_path, capsys):
    from ospo_fast.train import train

    pairs, full, killed = interrupted
    run = _copy_run(killed, tmp_path)
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 4, "loss": 0.6')  # an append cut off by a kill
    resumed = train(_integrity_config(), pairs, run)
    assert "metrics.jsonl: 23 bytes past step-000003 dropped" in capsys.readouterr().err
    _same_curve(full.metrics_path, resumed.metrics_path)


@pytest.mark.parametrize("text,line", [
    ('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', 2),  # damaged mid-file
    ('{"step": 1}\n{"step": 2, "lo\n', 2),  # a damaged line that was terminated: not a torn append
    ('{"step": 1}\n[1, 2]\n', 2),
], ids=["mid-file", "terminated", "not-an-object"])
def test_damaged_metrics_lines_are_errors(tmp_path, text, line):
    from ospo_fast.train.checkpoint import CheckpointError
    from ospo_fast.train.checkpoint import read_metrics as read

    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=rf"metrics.jsonl:{line} is not"):
        read(path)


def test_gradient_checkpointing_recomputes_the_decoder_layers(tmp_path, monkeypatch):
    """train.gradient_checkpointing runs each decoder layer through torch.utils.checkpoint (transformers 5's
    activation_checkpointing_enable; the deprecated gradient_checkpointing_enable warned on every run)."""
    import warnings

    import transformers.modeling_utils as modeling_utils

    from ospo_fast.train import train

    calls = {"n": 0}
    original = modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2, seed=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="`gradient_checkpointing_enable` is deprecated")
        train(tiny_config(max_steps=1, grad_accum=1, per_device_batch=1, gradient_checkpointing=True), pairs,
              tmp_path / "run")
    assert calls["n"] > 0


# -- guidance-aware options (loss.guided_rewards, loss.uncond_anchor) ------------------------------------------------
def _generated_pair_with_scores(bundle, guidance_scale: float):
    """Two prompts of different lengths generated by transformers' own ``generate`` at ``guidance_scale``, with
    the raw (conditional, unconditional) scores of every step; -> (batch, cond (2, T, V), uncond (2, T, V))."""
    from transformers import LogitsProcessorList

    from ospo_fast.train.data import PairSet, collate, prompt_token_ids

    model, processor = bundle.model, bundle.processor
    prompts = [PROMPTS[2], PROMPTS[1]]
    tokens, cond, uncond = [], [], []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt_token_ids(processor, prompt)])
        recorder = _Recorder()
        torch.manual_seed(i)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                             guidance_scale=guidance_scale, logits_processor=LogitsProcessorList([recorder]))
        tokens.append(out[0])
        scores = torch.stack(recorder.scores)  # (T, 2, V): rows [conditional, unconditional]
        cond.append(scores[:, 0])
        uncond.append(scores[:, 1])
    pairs = PairSet(pair_ids=["a"], prompt_ids=[torch.tensor(prompt_token_ids(processor, p)) for p in prompts],
                    tokens=torch.stack(tokens).view(1, 2, -1), masks=torch.rand(1, 2, 64), grid=8)
    batch = _two_prompt_batch(pairs, bundle.tokenizer.pad_token_id, collate)
    batch.mask_weights = torch.rand(batch.mask_weights.shape, generator=torch.Generator().manual_seed(0))
    return batch, torch.stack(cond), torch.stack(uncond)


def _guidance(bundle, scale: float, reference=None):
    from ospo_fast.engine.image_gen import special_ids
    from ospo_fast.train.trainer import Guidance

    return Guidance(scale, *special_ids(bundle), reference=reference)


@pytest.mark.parametrize("fused", [True, False])
def test_guided_rewards_are_the_loss_of_transformers_cfg_scores(tiny_bundle, fused):
    """loss.guided_rewards: the Obj-SimPO loss of the distribution transformers' Janus ``generate`` samples from
    at CFG s, u + s (c - u) of its own conditional/unconditional scores (recorded before its CFG processor), on a
    batch whose short prompt is left-padded. Without the option the loss is the conditional one, which differs."""
    from ospo_fast.ops.simpo_loss import obj_simpo_loss_ref
    from ospo_fast.train.trainer import PreferenceModel

    scale = 3.0
    batch, cond, uncond = _generated_pair_with_scores(tiny_bundle, scale)
    config = LossConfig(guided_rewards=True, fused=fused, backend="ref")
    model = PreferenceModel(tiny_bundle.model, config, guidance=_guidance(tiny_bundle, scale))
    with torch.no_grad():
        got = model(batch.prompt_ids, batch.prompt_mask, batch.image_tokens, batch.mask_weights)
    want = obj_simpo_loss_ref(uncond + scale * (cond - uncond), batch.image_tokens, batch.mask_weights, config)
    plain = obj_simpo_loss_ref(cond, batch.image_tokens, batch.mask_weights, config)
    for name in ("loss", "simpo_loss", "sft_loss", "margin"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-4, rtol=1e-4)
    assert abs(got.sft_loss.item() - plain.sft_loss.item()) > 1e-2


def test_guided_rewards_need_the_guidance():
    from ospo_fast.train.trainer import PreferenceModel

    with pytest.raises(ValueError, match="guidance=Guidance"):
        PreferenceModel(torch.nn.Linear(1, 1), LossConfig(guided_rewards=True))


def test_uncond_anchor_pulls_the_unconditional_branch_back_to_the_base_model(tmp_path):
    """loss.uncond_anchor = lam: loss = Obj-SimPO + SFT + lam * mean_chosen (r_u - r_u_ref)^2, with r_u the
    mean log-prob per token of the chosen image after Janus's unconditional prompt; r_u_ref comes from a separately
    loaded base model (the adapters off must be the base model). Zero at the start (LoRA B = 0), positive once the
    adapters move, and its gradient reaches the adapters."""
    from ospo_fast.ops.simpo_loss import obj_simpo_loss_ref
    from ospo_fast.train.trainer import Trainer, forward_loss

    config = tiny_config(bf16=False)
    config.loss.uncond_anchor = 1000.0
    trainer = Trainer(config, write_pairs(tmp_path / "pairs.jsonl", 4), tmp_path / "out",
                      bundle=load_janus("builtin:tiny", device="cpu"))
    core, batch = trainer.core, trainer._micro_batch(0)
    p = batch.image_tokens.shape[0] // 2
    rows = (batch.prompt_ids[:p], batch.prompt_mask[:p], batch.image_tokens[:p])
    with torch.no_grad():
        assert core.uncond_anchor_loss(batch.prompt_ids, batch.prompt_mask, batch.image_tokens) == 0
        for name, param in trainer.bundle.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    out = forward_loss(trainer.model, batch)

    uncond_ids = core.unconditional(batch.prompt_ids)
    g = core.guidance
    kept = (batch.prompt_ids == g.bos_id) | (batch.prompt_ids == g.boi_id)  # BOS and <begin_of_image> stay ...
    assert kept.sum(1).eq(2).all() and torch.equal(uncond_ids[kept], batch.prompt_ids[kept])
    assert (uncond_ids[~kept] == g.pad_id).all()  # ... and the text becomes pads
    base = load_janus("builtin:tiny", device="cpu").model
    with torch.no_grad():
        logits = core.image_logits(batch.prompt_ids, batch.prompt_mask, batch.image_tokens)
        policy = core.image_logits(uncond_ids[:p], *rows[1:])
        core.janus = base
        reference = core.image_logits(uncond_ids[:p], *rows[1:])
        core.janus = trainer.bundle.model

    def mean_logp(x):
        return x.log_softmax(-1).gather(-1, rows[2][..., None]).squeeze(-1).mean(1)

    anchor = (mean_logp(policy) - mean_logp(reference)).pow(2).mean()
    plain = obj_simpo_loss_ref(logits, batch.image_tokens, batch.mask_weights, config.loss).loss
    assert anchor > 1e-6  # a random tiny model's image log-probs are near uniform: the shift is small
    with torch.no_grad():
        got = core.uncond_anchor_loss(batch.prompt_ids, batch.prompt_mask, batch.image_tokens)
    torch.testing.assert_close(got, anchor, rtol=2e-3, atol=0)
    torch.testing.assert_close(out.loss.detach(), plain + 1000.0 * anchor, atol=1e-4, rtol=1e-4)
    core.uncond_anchor_loss(batch.prompt_ids, batch.prompt_mask, batch.image_tokens).backward()
    grads = [q.grad for n, q in trainer.bundle.model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
    """train.tensorboard=true: the event file under <out>/tensorboard, read back with TensorBoard's own reader,
    holds each step's loss, SimPO and SFT as metrics.jsonl has them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ospo_fast.train import train

    pairs = write_pairs(tmp_path / "pairs.jsonl", 2, seed=3)
    config = tiny_config(max_steps=3, save_every=3, per_device_batch=1, grad_accum=1, tensorboard=True)
    result = train(config, pairs, tmp_path / "out")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    logged = {m["step"]: m for m in read_metrics(result.metrics_path) if "loss" in m}
    for key in ("loss", "simpo", "sft"):
        scalars = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert sorted(scalars) == sorted(logged) == [1, 2, 3]
        for step, value in scalars.items():
            assert value == pytest.approx(logged[step][key], rel=1e-6)


def test_a_merged_model_and_a_checkpoint_are_read_only_when_every_file_matches(lora_run, tmp_path):
    """The merged model carries checksums.json: load_janus refuses it after a flipped byte, naming the file (eval-gen
    drew with the damaged model, and iteration 2 would have trained from it); a checkpoint whose checksums.json
    lists only some of its files is damaged too."""
    import shutil

    from ospo_fast.models import ModelLoadError
    from ospo_fast.store import CHECKSUM_FILE, directory_damage, directory_files

    result = lora_run[0]
    merged = tmp_path / "merged"
    shutil.copytree(result.merged_dir, merged)
    assert directory_damage(merged) is None and (merged / CHECKSUM_FILE).is_file()
    load_janus(str(merged), device="cpu")  # intact: loads
    weights = next(name for name in directory_files(merged) if name.endswith(".safetensors"))
    data = bytearray((merged / weights).read_bytes())
    data[len(data) // 2] ^= 0x01
    (merged / weights).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=f"{weights} does not match its sha256"):
        load_janus(str(merged), device="cpu")

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(result.checkpoint_dir, checkpoint)
    listed = json.loads((checkpoint / CHECKSUM_FILE).read_text())
    dropped = sorted(listed["sha256"])[0]
    del listed["sha256"][dropped]
    (checkpoint / CHECKSUM_FILE).write_text(json.dumps(listed))
    assert directory_damage(checkpoint) == f"{dropped} is not listed in {CHECKSUM_FILE}"
