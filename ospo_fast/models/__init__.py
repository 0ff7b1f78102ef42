"""Janus model layer: ``load_janus`` (checkpoints, hub ids, built-in offline models) and the offline factory."""

from ospo_fast.models.loader import JanusBundle, ModelLoadError, load_janus, resolve_model_path

__all__ = ["JanusBundle", "ModelLoadError", "load_janus", "resolve_model_path"]
