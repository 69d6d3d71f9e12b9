"""Models with their parallel layout and optimizer, behind the alignable interface (``aligner.interface``)."""
from aligner.wrappers.optimizer import LRSchedule, build_optimizer, clip_grad_norm, lr_at, move_optimizer_state
from aligner.wrappers.policy import PolicyModel

__all__ = ["LRSchedule", "PolicyModel", "build_optimizer", "clip_grad_norm", "lr_at", "move_optimizer_state"]
