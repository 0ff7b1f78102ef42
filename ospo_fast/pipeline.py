"""The orchestrator of stages 1-4: it only sequences, shards, resumes and stores.

Each stage runs over this process's shard of its input (every ``world``-th record, by position in the merged,
id-sorted input), in fixed chunks; a finished chunk is a file, so a re-run skips it. When every rank is done,
rank 0 merges the chunks (sorted by id) and the others wait at a barrier. With ``torchrun --nproc_per_node=N`` the
process group comes from the environment (``ospo_fast.distributed``: nccl only when every rank has a CUDA device of
its own, else gloo); alone, world = 1 and nothing is initialised.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ospo_fast.config import OSPOConfig, save_config
from ospo_fast.distributed import Dist, init_distributed
from ospo_fast.runstore import RunStore
from ospo_fast.stages import prompts as S1
from ospo_fast.stages import steps
from ospo_fast.stages.context import StageContext
from ospo_fast.stages.select import best_vs_worst, select_best

STAGES = ("prompts", "perturb", "densify", "images", "questions", "vqa", "select")


ChunkFn = Callable[[list[dict]], tuple[list[dict], list[dict]]]


class Pipeline:
    """Runs stages 1-4 into ``out_dir``. ``redo`` names a stage to recompute (it and every later stage)."""

    def __init__(self, config: OSPOConfig, out_dir: str | Path, dist: Dist | None = None,
                 redo: str | None = None, progress: bool = True):
        self.config = config
        self.dist = dist or init_distributed(config.model.device)
        self.store = RunStore(out_dir, self.dist.rank, self.dist.world)
        self.ctx = StageContext(config, device=str(self.dist.device))
        self.progress = progress and self.dist.rank == 0
        if redo is not None and redo not in STAGES:
            raise ValueError(f"redo={redo!r} is not a stage; stages: {list(STAGES)}")
        if self.dist.rank == 0:
            if redo:
                for stage in STAGES[STAGES.index(redo):]:
                    self.store.clear_stage(stage)
                (self.store.root / "pairs.jsonl").unlink(missing_ok=True)  # select's output: every redo reaches it
            save_config(config, self.store.root / "config.yaml")
        self.dist.barrier()

    # -------------------------------------------------------------- the generic sharded, chunked stage
    def _run_stage(self, stage: str, items: list[dict], fn: ChunkFn, chunk_size: int) -> list[dict]:
        if self.store.stage_done(stage):
            return self.store.read_stage(stage)
        self.store.check_world(stage)
        start = time.perf_counter()
        mine = items[self.dist.rank::self.dist.world]
        chunks = [mine[i:i + chunk_size] for i in range(0, len(mine), chunk_size)]
        for index, chunk in enumerate(self._bar(chunks, stage)):
            if not self.store.chunk_done(stage, index):
                records, rejects = fn(chunk)
                self.store.write_chunk(stage, index, records, rejects)
        self.dist.barrier()
        if self.dist.rank == 0:
            self.store.merge(stage, seconds=time.perf_counter() - start)
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
            self.store.check_world(stage)
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
                merged = self.store.merge(stage, seconds=time.perf_counter() - start)
                self._dedup_merged(stage, merged, cfg.num_prompts)
            self.dist.barrier()
        return self.store.read_stage(stage)

    def _dedup_merged(self, stage: str, merged: list[dict], limit: int) -> None:
        from ospo_fast.store import atomic_write_jsonl

        seen, keep, extra = set(), [], []
        for record in merged:
            key = record["prompt"].lower()
            if key in seen or len(keep) >= limit:
                extra.append({"id": record["id"], "stage": stage,
                              "reason": "duplicate" if key in seen else "over_quota"})
            else:
                seen.add(key)
                keep.append(record)
        if extra:
            atomic_write_jsonl(self.store.root / stage / "records.jsonl", keep)
            rejects = self.store.read_rejects(stage) + extra
            atomic_write_jsonl(self.store.root / stage / "rejects.jsonl", rejects)
            entry = self.store.manifest()["stages"][stage]
            entry["records"], entry["rejects"] = len(keep), len(rejects)
            for r in extra:
                entry["reject_reasons"][r["reason"]] = entry["reject_reasons"].get(r["reason"], 0) + 1
            self.store.update_manifest(stage, entry)

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
        scored = self._run_stage("vqa", images, lambda c: steps.vqa_chunk(self.ctx, c, asked, self.store.root),
                                 max(1, self.config.filter.vqa_batch_size // 2))
        return self._select(scored)

    def _select(self, scored: list[dict]) -> list[dict]:
        if self.dist.rank == 0 and not (self.store.root / "pairs.jsonl").is_file():
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
            self.store.write_final("pairs.jsonl", pairs)
        self.dist.barrier()
        from ospo_fast.store import read_jsonl

        return read_jsonl(self.store.root / "pairs.jsonl")


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
