"""Stage 5: Obj-SimPO + SFT training (LoRA or full fine-tuning, DDP/FSDP2, exact resume, LoRA merge)."""

from ospo_fast.train.checkpoint import CheckpointError
from ospo_fast.train.data import PairsFileError, load_pair_set, read_pairs
from ospo_fast.train.lora import merge_lora
from ospo_fast.train.trainer import PreferenceModel, TrainingDivergedError, TrainResult, train

__all__ = ["CheckpointError", "PairsFileError", "PreferenceModel", "TrainResult", "TrainingDivergedError",
           "load_pair_set", "merge_lora", "read_pairs", "train"]
