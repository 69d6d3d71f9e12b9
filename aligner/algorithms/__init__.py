"""Pure math for alignment: losses, sequence reductions (no models, no torch.distributed, no I/O)."""
from aligner.algorithms.advantages import (
    gae, grpo_advantages, reinforce_loo_advantages, rloo_advantages, whiten,
)
from aligner.algorithms.kl import kl_estimate, kl_k1, kl_k2, kl_k3
from aligner.algorithms.kto import kto_loss
from aligner.algorithms.policy_loss import (
    aggregate_loss, aggregate_sum, aggregate_units, ppo_policy_loss, value_loss,
)
from aligner.algorithms.preference import cpo_loss, dpo_loss, log1mexp, orpo_loss, simpo_loss
from aligner.algorithms.reward import bradley_terry_loss
from aligner.algorithms.rewards import accuracy, format_reward, last_number, parse_number
from aligner.algorithms.self_rewarding import (
    BAD_REASONS, PairChoice, choose_pair, comparison_pairs, disagreement, elo_ratings, length_control_at,
    meta_judge_pair, score_stats, wins_from_comparisons,
)
from aligner.algorithms.sequence import last_token_values, sequence_logps

__all__ = [
    "bradley_terry_loss", "cpo_loss", "dpo_loss", "kto_loss", "last_token_values", "log1mexp",
    "orpo_loss", "sequence_logps", "simpo_loss",
    # online RL
    "aggregate_loss", "aggregate_sum", "aggregate_units", "gae", "grpo_advantages", "kl_estimate", "kl_k1",
    "kl_k2", "kl_k3", "ppo_policy_loss", "reinforce_loo_advantages", "rloo_advantages", "value_loss", "whiten",
    # rule rewards, referenced by import path: aligner.algorithms.rewards:accuracy
    "accuracy", "format_reward", "last_number", "parse_number",
    # self-rewarding and meta-rewarding
    "BAD_REASONS", "PairChoice", "choose_pair", "comparison_pairs", "disagreement", "elo_ratings",
    "length_control_at", "meta_judge_pair", "score_stats", "wins_from_comparisons",
]
