"""Training checkpoints: DCP save/load at any layout, ``latest``, keep-last-N, resume lookup, RNG, HF export."""
from aligner.checkpoint.dcp import MODEL_CONFIG_FILE, load_checkpoint, read_trainer_state, save_checkpoint
from aligner.checkpoint.export import export_hf
from aligner.checkpoint.layout import (
    checkpoint_step, checkpoints_dir, find_resume_checkpoint, is_complete_checkpoint, list_checkpoints,
)

__all__ = [
    "MODEL_CONFIG_FILE", "checkpoint_step", "checkpoints_dir", "export_hf", "find_resume_checkpoint",
    "is_complete_checkpoint", "list_checkpoints", "load_checkpoint", "read_trainer_state", "save_checkpoint",
]
