"""The orchestrator of stages 1-4: it only sequences, shards, resumes and stores.

Each stage runs over this process's shard of its input (every ``world``-th record, by position in the merged,
id-sorted input), in fixed chunks; a finished chunk is a file, so a re-run skips it. When every rank is done,
rank 0 merges the chunks (sorted by id) and the others wait at a barrier. With ``torchrun --nproc_per_node=N`` the
process group comes from the environment (``ospo_fast.distributed``: nccl only when every rank has a CUDA device of
its own, else gloo); alone, world = 1 and nothing is initialised.

Resume is checked, never assumed: each stage's fingerprint (``stage_fingerprints``: its settings, the model's
identity, the prompt file's checksum) is recorded before its first chunk, and a later run with other settings stops
before it writes anything, naming the keys that differ and the ``--redo`` that recomputes the stage. What a stage
reads back is checked against the checksums it was committed with (``ospo_fast.runstore``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ospo_fast.config import OSPOConfig, config_yaml
from ospo_fast.distributed import Dist, init_distributed
from ospo_fast.models.loader import model_identity
from ospo_fast.overlap import BackgroundWriter
from ospo_fast.plan import IMAGE_PROMPT_TOKENS, resolve_auto_batches
from ospo_fast.runstore import RunStore, is_run_directory
from ospo_fast.stages import STAGES, steps
from ospo_fast.stages import prompts as S1
from ospo_fast.stages.context import StageContext
from ospo_fast.stages.select import best_vs_worst, select_best
from ospo_fast.store import StoreError, check_fingerprint, config_fingerprint, file_identity

ChunkFn = Callable[[list[dict]], tuple[list[dict], list[dict]]]

# What determines a stage's output besides its input records (an earlier stage, checked on its own): config keys
# or whole sections. Every stage but select also depends on the model (path identity, dtype, attention).
STAGE_SETTINGS = {
    "prompts": ("seed", "prompts"),
    "perturb": ("seed", "prompts.vocabulary", "prompts.chunk_size", "perturb"),
    "densify": ("seed", "prompts.chunk_size", "densify"),
    "images": ("seed", "perturb.num_perturbations", "images", "masks"),
    "questions": ("seed", "prompts.chunk_size", "questions"),
    "vqa": ("filter.tau", "filter.vqa_batch_size"),
    "select": ("filter", "perturb.source"),
}
MODEL_SETTINGS = ("model.dtype", "model.attn_implementation")


def _setting(config: OSPOConfig, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def stage_fingerprints(config: OSPOConfig) -> dict[str, dict]:
    """Per stage, ``store.config_fingerprint`` of everything that determines its output: its settings, the model's
    identity (``models.loader.model_identity``: its content) and, for a prompts file, that file's sha256."""
    model = {"model.identity": model_identity(config.model.path)} | {k: _setting(config, k) for k in MODEL_SETTINGS}
    out = {}
    for stage, keys in STAGE_SETTINGS.items():
        parts = {key: _setting(config, key) for key in keys} | (model if stage != "select" else {})
        if stage == "prompts" and config.prompts.source == "file":
            parts["prompts.file_identity"] = file_identity(config.prompts.file)
        out[stage] = config_fingerprint(parts)
    return out


def check_stage_fingerprints(store: RunStore, fingerprints: dict[str, dict], redo: str | None = None) -> None:
    """Refuse to resume a stage that was started with other settings, naming the keys and the --redo; stages that
    ``redo`` recomputes are not checked. Reads only."""
    for stage in STAGES[:STAGES.index(redo)] if redo else STAGES:
        check_fingerprint(store.fingerprint(stage), fingerprints[stage], f"stage {stage!r} in {store.root}",
                          f"resume with the settings in {store.root / 'config.yaml'}, or pass --redo {stage} "
                          "to recompute it and every later stage")


def check_resumable(config: OSPOConfig, out_dir: str | Path, device, redo: str | None = None) -> None:
    """Before a run writes anything: the synthesis in ``out_dir`` (if any) was started with these settings (the
    "auto" batch sizes resolved on ``device`` as the pipeline will resolve them), else FingerprintMismatch. Reads
    only: a refused rerun leaves the directory byte-identical."""
    if not is_run_directory(Path(out_dir)) or redo == STAGES[0]:
        return
    store = RunStore.reader(out_dir)
    store.verify()
    resolved = resolve_auto_batches(config, device, log=lambda line: None)
    check_stage_fingerprints(store, stage_fingerprints(resolved), redo)


class Pipeline:
    """Runs stages 1-4 into ``out_dir``. ``redo`` names a stage to recompute (it and every later stage)."""

    def __init__(self, config: OSPOConfig, out_dir: str | Path, dist: Dist | None = None,
                 redo: str | None = None, progress: bool = True):
        self.dist = dist or init_distributed(config.model.device)
        # "auto" batch sizes become numbers here, once, from the device's memory (printed by rank 0); an images
        # batch planned so is kept within its planned KV slots when the real prompt bucket is longer
        planned = IMAGE_PROMPT_TOKENS if config.images.batch_size == "auto" else None
        self.config = config = resolve_auto_batches(config, self.dist.device,
                                                    log=print if self.dist.rank == 0 else lambda line: None)
        self.store = RunStore(out_dir, self.dist.rank, self.dist.world)
        self.ctx = StageContext(config, device=str(self.dist.device), planned_image_prompt=planned)
        self.progress = progress and self.dist.rank == 0
        self.overlap_writes = True  # False: write each chunk in series (bench_fullsize.py --overlap compares)
        if redo is not None and redo not in STAGES:
            raise StoreError(f"--redo {redo!r} is not a stage; give one of {list(STAGES)}")
        self.fingerprints = stage_fingerprints(config)
        if self.dist.rank == 0:
            if redo == STAGES[0]:
                self.store.reset_manifest()  # everything is recomputed, even after a damaged manifest
            self.store.verify()  # the manifest is the newest this directory has had (not deleted, not rolled back)
            if redo:
                for stage in STAGES[STAGES.index(redo):]:
                    self.store.clear_stage(stage)
                self.store.clear_final("pairs.jsonl")  # select's output: every redo reaches it
            self._check_fingerprints()
            self.store.commit_file("config.yaml", config_yaml(config).encode("utf-8"))  # once the outputs agree
        self.dist.barrier()

    def _check_fingerprints(self) -> None:
        check_stage_fingerprints(self.store, self.fingerprints)

    def _start_stage(self, stage: str) -> None:
        """Record the stage's fingerprint before its first chunk (rank 0; the other ranks only read it)."""
        self.store.check_world(stage)
        if self.dist.rank == 0 and self.store.fingerprint(stage) is None:
            self.store.record_fingerprint(stage, self.fingerprints[stage])

    # -------------------------------------------------------------- the generic sharded, chunked stage
    def _run_stage(self, stage: str, items: list[dict], fn: ChunkFn, chunk_size: int) -> list[dict]:
        if self.store.stage_done(stage):
            return self.store.read_stage(stage)
        self._start_stage(stage)
        start = time.perf_counter()
        mine = items[self.dist.rank::self.dist.world]
        chunks = [mine[i:i + chunk_size] for i in range(0, len(mine), chunk_size)]
        # a chunk's PNGs and files are written on a worker thread while the next chunk computes (ospo_fast.overlap)
        with BackgroundWriter(self.store.write_chunk, enabled=self.overlap_writes) as writer:
            for index, chunk in enumerate(self._bar(chunks, stage)):
                if not self.store.chunk_done(stage, index):
                    records, rejects = fn(chunk)
                    writer.submit(stage, index, records, rejects)
        self.dist.barrier()
        if self.dist.rank == 0:
            self.store.merge(stage, seconds=time.perf_counter() - start, notes=self.ctx.stage_notes(stage))
        self.dist.barrier()
        return self.store.read_stage(stage)

    def _bar(self, chunks: list, stage: str):
        if not self.progress:
            return chunks
        from tqdm import tqdm

        return tqdm(chunks, desc=f"{stage:<9}", unit="chunk", leave=True)

    # -------------------------------------------------------------- stages
    def base_prompts(self) -> list[dict]:
        cfg = self.config.prompts
        if cfg.source == "sampler":
            items = [{"id": f"p{i:06d}", "index": i} for i in range(cfg.num_prompts)]
            fn = lambda chunk: (S1.sample_prompts(self.ctx.vocab, cfg, [c["index"] for c in chunk],
                                                  self.config.seed), [])
            return self._run_stage("prompts", items, fn, cfg.chunk_size)
        if cfg.source == "file":
            records = S1.read_prompt_file(cfg.file)
            return self._run_stage("prompts", records, lambda chunk: (chunk, []), cfg.chunk_size)
        return self._model_prompts()

    def _model_prompts(self) -> list[dict]:
        """In-context generation: chunks are request batches, run until this rank's quota is met (at most 4x
        the quota in requests); duplicates across ranks are removed at the merge."""
        stage, cfg = "prompts", self.config.prompts
        if not self.store.stage_done(stage):
            self._start_stage(stage)
            start = time.perf_counter()
            quota = -(-cfg.num_prompts // self.dist.world)
            max_chunks = max(1, -(-4 * quota // cfg.batch_size))
            history: list[dict] = []
            for index in self._bar(range(max_chunks), stage):
                if len(history) >= quota:
                    break
                if self.store.chunk_done(stage, index):
                    history += self.store.read_chunk(stage, index)
                    continue
                records, rejects = steps.model_prompts_chunk(self.ctx, index, self.dist.rank, history)
                seen = {h["prompt"].lower() for h in history}
                fresh = []
                for record in records:
                    if record["prompt"].lower() in seen:
                        rejects.append({"id": record["id"], "stage": stage, "reason": "duplicate"})
                    else:
                        seen.add(record["prompt"].lower())
                        fresh.append(record)
                self.store.write_chunk(stage, index, fresh, rejects)
                history += fresh
            self.dist.barrier()
            if self.dist.rank == 0:
                dedup = lambda records, rejects: _dedup_merged(stage, records, rejects, cfg.num_prompts)
                self.store.merge(stage, seconds=time.perf_counter() - start, finalize=dedup)
            self.dist.barrier()
        return self.store.read_stage(stage)

    def run(self) -> list[dict]:
        """All of stages 1-4; returns the selected pairs (also written to ``pairs.jsonl``)."""
        chunk = self.config.prompts.chunk_size
        base = self.base_prompts()
        perturbed = self._run_stage("perturb", base, lambda c: steps.perturb_chunk(self.ctx, c), chunk)
        dense = self._run_stage("densify", perturbed, lambda c: steps.densify_chunk(self.ctx, c), chunk)
        images = self._run_stage("images", dense, lambda c: steps.images_chunk(self.ctx, c),
                                 max(1, self.config.images.batch_size // 2))
        questions = self._run_stage("questions", base, lambda c: steps.questions_chunk(self.ctx, c), chunk)
        asked = {q["id"]: q["questions"] for q in questions}
        vqa = lambda c: steps.vqa_chunk(self.ctx, c, asked, self.store.load_image)
        scored = self._run_stage("vqa", images, vqa,
                                 max(1, self.config.filter.vqa_batch_size // 2))
        return self._select(scored)

    def _select(self, scored: list[dict]) -> list[dict]:
        written = False
        if self.dist.rank == 0 and not self.store.final_done("pairs.jsonl"):
            written = True
            self._start_stage("select")
            start = time.perf_counter()
            by_prompt: dict[str, list[dict]] = defaultdict(list)
            for record in scored:
                if not self.config.filter.enabled:
                    record = dict(record, verdict=dict(record["verdict"], keep=True))
                by_prompt[record["base_id"]].append(record)
            pairs, rejects = [], []
            pick = best_vs_worst if self.config.perturb.source == "best_of_n" else select_best
            for base_id in sorted(by_prompt):
                best = pick(by_prompt[base_id])
                if best is None:
                    rejects.append({"id": base_id, "stage": "select", "reason": "no_surviving_pair"})
                else:
                    pairs.append(to_pair(best))
            self.store.write_chunk("select", 0, pairs, rejects)
            self.store.merge("select", seconds=time.perf_counter() - start)
            self.store.write_final("pairs.jsonl", pairs)  # its manifest entry commits the selection
        self.dist.barrier()
        return self.store.read_final("pairs.jsonl", images=not written)  # a resume checks every PNG of the pairs


def _dedup_merged(stage: str, merged: list[dict], rejects: list[dict], limit: int) -> tuple[list[dict], list[dict]]:
    """Across ranks: drop repeated prompts (case-insensitive) and keep at most ``limit``; part of the merge, so the
    stage is committed only in its final form."""
    seen, keep, extra = set(), [], []
    for record in merged:
        key = record["prompt"].lower()
        if key in seen or len(keep) >= limit:
            extra.append({"id": record["id"], "stage": stage,
                          "reason": "duplicate" if key in seen else "over_quota"})
        else:
            seen.add(key)
            keep.append(record)
    return keep, rejects + extra


def to_pair(record: dict) -> dict:
    """A selected candidate as a training pair (the trainer's input format)."""
    side = lambda s: {k: record[s][k] for k in ("image", "tokens", "mask")} | {
        "score": record["verdict"]["score_chosen" if s == "chosen" else "score_rejected"], "vqa": record[s]["vqa"]}
    grid = int(round(len(record["chosen"]["tokens"]) ** 0.5))
    return {"id": record["id"], "pair_id": record["id"], "base_id": record["base_id"], "prompt": record["base_prompt"],
            "category": record["category"], "kind": record["kind"], "perturbed_prompt": record["prompt"],
            "dense_chosen": record["dense_base"], "dense_rejected": record["dense_prompt"],
            "questions": record["questions"], "grid": grid, "structure": record["base_structure"],
            "mask_objects": record["mask_objects"], "chosen": side("chosen"), "rejected": side("rejected")}


def run_synthesis(config: OSPOConfig, out_dir: str | Path, redo: str | None = None) -> list[dict]:
    """Stages 1-4 for ``config`` into ``out_dir`` (resumable; torchrun-aware)."""
    return Pipeline(config, out_dir, init_distributed(config.model.device), redo=redo).run()
