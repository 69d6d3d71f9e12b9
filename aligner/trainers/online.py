"""One online loop for PPO, GRPO, RLOO and REINFORCE (leave-one-out): rollout with the engine -> score ->
reference log-probs -> values (PPO) -> advantages -> ``num_ppo_epochs`` x ``num_mini_batches`` optimizer
steps -> refit.

    python examples/train_grpo.py [overrides]      # same as: aligner train grpo [overrides]
    aligner train ppo|rloo|reinforce [overrides]

Each loop step takes ``trainer.global_batch_size`` prompts (split over data-parallel ranks) and samples
``k`` responses to each (``grpo.num_generations``, ``rloo.rloo_k``, ``reinforce.num_rollouts_per_prompt``).
Rollouts come from ``PolicyModel.generate`` (the engine refits lazily after each optimizer step). The
"old" log-probs are recomputed with a no-grad forward rather than taken from the engine, so the first
epoch's ratio is exactly 1; the gap to the engine's is logged as ``rollout/logprob_mismatch``. With one
optimizer step per rollout (:func:`old_from_training_forward`) that forward is skipped, as TRL does: the
training forward's own log-probs, detached, are the old ones, and the statistics of the old log-probs
(``objective/entropy``, ``objective/kl``, ``rollout/logprob_mismatch`` ...) come from it. Sampling
seeds are derived from ``trainer.seed``, the step and the data-parallel rank, so a resumed run draws the
same rollouts. Metric names follow the RLOO reference page (docs/debugging-rl.md).
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch

from aligner.algorithms import (
    gae,
    grpo_advantages,
    last_token_values,
    reinforce_loo_advantages,
    rloo_advantages,
    whiten,
)
from aligner.config import load_config
from aligner.data import ResumableDistributedSampler
from aligner.generation.engine import SamplingParams, warn_if_distribution_changed
from aligner.logging import format_sample_table, save_samples
from aligner.models.fetch import resolve_model_path
from aligner.models.tokenizer import load_tokenizer
from aligner.parallel.collectives import sum_over
from aligner.trainers.loop import Hooks, SamplerBatches, run_training, start_run, total_steps_of
from aligner.trainers.online_batch import (
    build_prompt_data,
    from_group_layout,
    group_rows,
    response_texts,
    rollout_batch,
    to_group_layout,
)
from aligner.trainers.online_losses import PolicyGradientLoss, TokenLogps, ValueLoss, rollout_logprob_sums
from aligner.trainers.reference import SwappedReference
from aligner.trainers.reward_functions import RewardFunctions
from aligner.wrappers import PolicyModel

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce")
KL_WARN_RANGE = (0.0, 10.0)  # the FAQ: objective/kl should stay positive and moderate
SAMPLE_ROWS = 4  # rows of the sample table


class OnlineSettings:
    """The algorithm section read into one shape: ``k``, KL placement, epochs, clip ranges, lengths."""

    def __init__(self, algorithm: str, a: Any):
        self.algorithm = algorithm
        if algorithm == "grpo":
            self.k, self.epochs, self.kl_in_reward, self.kl_coef = a.num_generations, a.num_iterations, False, a.beta
            self.max_new_tokens, self.cliprange, self.cliprange_high = a.max_completion_length, a.epsilon, a.epsilon_high
        elif algorithm == "rloo":
            self.k, self.epochs, self.kl_in_reward, self.kl_coef = a.rloo_k, a.num_ppo_epochs, True, a.kl_coef
            self.max_new_tokens, self.cliprange, self.cliprange_high = a.response_length, a.cliprange, None
        elif algorithm == "ppo":  # one sample per prompt; GAE on per-token rewards and the critic's values
            self.k, self.epochs, self.kl_in_reward, self.kl_coef = 1, a.num_ppo_epochs, True, a.kl_coef
            self.max_new_tokens, self.cliprange, self.cliprange_high = a.response_length, a.cliprange, None
        elif algorithm == "reinforce":
            self.k, self.epochs, self.kl_in_reward = a.num_rollouts_per_prompt, a.num_ppo_epochs, True
            self.kl_coef = a.initial_policy_kl_penalty
            self.max_new_tokens, self.cliprange, self.cliprange_high = a.response_length, a.cliprange, None
        else:
            raise ValueError(f"unknown online algorithm '{algorithm}'; use one of {', '.join(ALGORITHMS)}")
        if self.k < 2 and algorithm != "ppo":
            raise ValueError(f"{algorithm}: {self.k} samples per prompt leaves no baseline; use at least 2")
        self.num_mini_batches, self.temperature = a.num_mini_batches, a.temperature
        self.missing_eos_penalty = a.missing_eos_penalty
        # The reference OnPolicyConfig's knobs (PPO, RLOO): rows per no-grad forward and the stop token.
        self.forward_batch_size = getattr(a, "local_rollout_forward_batch_size", None)
        if self.forward_batch_size is not None and self.forward_batch_size < 1:
            raise ValueError(f"{algorithm}.local_rollout_forward_batch_size={self.forward_batch_size} must be >= 1")
        self.stop_token, self.stop_token_id = getattr(a, "stop_token", None), getattr(a, "stop_token_id", None)
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"{algorithm}.stop_token='{self.stop_token}' is not null or 'eos'; for another token "
                             f"set {algorithm}.stop_token_id to its id")
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ValueError(f"{algorithm}.stop_token and {algorithm}.stop_token_id exclude each other (as in TRL); "
                             f"set one of them")
        self.num_sample_generations = a.num_sample_generations
        self.needs_reference = self.kl_coef > 0
        self.sequence_level = algorithm in ("rloo", "reinforce")


def old_from_training_forward(s: OnlineSettings) -> bool:
    """Whether the old log-probs can be the training forward's own (detached), skipping their no-grad forward.

    With one epoch of one mini-batch the only optimizer step comes after the only training forward, which runs
    on the weights that sampled the rollout: its log-probs are the old ones and the ratio is exactly 1. Not
    when the KL is folded into the reward (RLOO, REINFORCE, PPO with a KL coefficient): the advantages need
    the old log-probs before training starts.
    """
    return s.epochs == 1 and s.num_mini_batches == 1 and not (s.kl_in_reward and s.kl_coef > 0)


def stop_settings(s: OnlineSettings, generation: Any, vocab_size: int, model_dir: str) -> tuple[list[int], bool]:
    """(stop token ids, ignore EOS?) of the rollouts: ``generation.stop_token_ids`` plus the algorithm's
    ``stop_token_id``; EOS is ignored only with ``generation.ignore_eos`` and no ``stop_token: eos``."""
    ids = list(generation.stop_token_ids)
    if s.stop_token_id is not None:
        if not 0 <= s.stop_token_id < vocab_size:
            raise ValueError(f"{s.algorithm}.stop_token_id={s.stop_token_id} is not a token id of {model_dir}'s "
                             f"tokenizer (0 to {vocab_size - 1})")
        ids.append(int(s.stop_token_id))
    return ids, bool(generation.ignore_eos) and s.stop_token != "eos"


def rollout_statistics(means: dict[str, float], kl_coef: float) -> dict[str, float]:
    """The logged statistics of the policy's log-probs of the rollout, from per-row means of
    :func:`rollout_logprob_sums`'s entries and the mean score (``objective/scores``)."""
    kl = means.get("rollout_kl_sum", 0.0)  # no reference model: the policy is its own reference
    return {
        "objective/kl": kl, "objective/entropy": means["rollout_nll_sum"],
        "objective/non_score_reward": -kl_coef * kl, "objective/rlhf_reward": means["objective/scores"] - kl_coef * kl,
        "objective/negative_kl_frac": means.get("rollout_negative_kl_sum", 0.0),
        "rollout/logprob_mismatch": means["rollout_mismatch_sum"],
    }


def _mean_over_dp(policy: PolicyModel, values: dict[str, float], counts: float) -> dict[str, float]:
    """Sums over this rank's rows -> means over the global batch (one all-reduce)."""
    names = sorted(values)
    t = sum_over(torch.tensor([values[n] for n in names] + [counts], dtype=torch.float64), policy.pmesh["dp"])
    return {n: float(t[i] / max(float(t[-1]), 1.0)) for i, n in enumerate(names)}


def sequence_rewards(s: OnlineSettings, scores: torch.Tensor, kl_sum: torch.Tensor) -> torch.Tensor:
    """The reward each advantage is computed from: the score, minus ``kl_coef * KL`` where the KL is folded
    into the reward (RLOO, REINFORCE); GRPO keeps its KL in the loss."""
    return scores - s.kl_coef * kl_sum if s.kl_in_reward else scores


def advantages_of(s: OnlineSettings, rewards: torch.Tensor, a: Any) -> torch.Tensor:
    """Per-sequence advantages ``[N]`` of prompt-major rewards (sample j of prompt i at ``i * k + j``)."""
    if s.algorithm == "grpo":
        return grpo_advantages(rewards, s.k, scale=a.scale_rewards)
    if s.algorithm == "rloo":
        # The reference page's layout is k-major: block j holds sample j of every prompt.
        n = rewards.numel() // s.k
        adv = rloo_advantages(rewards.reshape(n, s.k).t().reshape(-1), s.k)
        adv = adv.reshape(s.k, n).t().reshape(-1)
        return whiten(adv) if a.whiten_rewards else adv
    return reinforce_loo_advantages(rewards, s.k)


def train_online(algorithm: str, cfg) -> dict[str, float]:
    """Run ``algorithm`` (one of :data:`ALGORITHMS`) as configured; returns the last logged metrics."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown online algorithm '{algorithm}'; use one of {', '.join(ALGORITHMS)}")
    a = getattr(cfg, algorithm)
    s = OnlineSettings(algorithm, a)
    if not cfg.model.path:
        raise ValueError(f"model.path is not set: {algorithm} needs a checkpoint directory with a tokenizer")
    if algorithm == "ppo" and not a.reward_model.path:
        raise ValueError("ppo.reward_model.path is not set: PPO needs a reward model (from `aligner train rm`); its "
                         "critic starts from it unless ppo.critic.path is set")
    if not a.reward_funcs and not a.reward_model.path:
        raise ValueError(f"{algorithm} has no reward: set {algorithm}.reward_funcs=[module:function, ...] and/or "
                         f"{algorithm}.reward_model.path=DIR (a reward model from `aligner train rm`)")
    n_rewards = len(a.reward_funcs) + (1 if a.reward_model.path else 0)
    weights = list(a.reward_weights) if a.reward_weights is not None else [1.0] * n_rewards
    if len(weights) != n_rewards:
        raise ValueError(f"{algorithm}.reward_weights has {len(weights)} entries for {n_rewards} rewards "
                         f"({len(a.reward_funcs)} reward_funcs{' + the reward model' if a.reward_model.path else ''})")
    # Reward functions are imported before any model loads, so a bad import path fails in seconds.
    reward_fns = RewardFunctions(list(a.reward_funcs), weights[:len(a.reward_funcs)]) if a.reward_funcs else None
    run = start_run(cfg)
    model_dir = str(resolve_model_path(cfg.model.path))
    cfg.model.path = model_dir
    tokenizer = load_tokenizer(model_dir)
    stop_token_ids, ignore_eos = stop_settings(s, cfg.generation, tokenizer.vocab_size, model_dir)
    prompts = build_prompt_data(cfg.data.train, tokenizer, cfg.trainer.max_seq_len - s.max_new_tokens,
                                cfg.data.overlong)
    run.print(f"prompts: {prompts.describe()}")
    if reward_fns is not None:  # a reward function's missing column fails here, before any model loads
        reward_fns.check_columns(sorted({k for r in prompts.records for k in r if k != "prompt"}))
    if cfg.trainer.global_batch_size % max(1, run.pmesh.dims.dp):
        raise ValueError(f"trainer.global_batch_size={cfg.trainer.global_batch_size} prompts do not split over "
                         f"{run.pmesh.dims.dp} data-parallel ranks")

    policy = PolicyModel(cfg, run.pmesh)
    policy.configure_generation(cfg.generation, tokenizer)
    warn_if_distribution_changed(cfg.generation, algorithm)
    reference = SwappedReference(policy) if s.needs_reference else None
    reward_model = None
    if a.reward_model.path:
        rm_cfg = copy.deepcopy(cfg)
        rm_cfg.model = a.reward_model
        rm_cfg.model.path = str(resolve_model_path(a.reward_model.path))
        reward_model = PolicyModel(rm_cfg, run.pmesh, value_head=True)
    critic = None
    if algorithm == "ppo":
        critic_cfg = copy.deepcopy(cfg)
        critic_cfg.model = copy.deepcopy(a.critic if a.critic.path else a.reward_model)
        critic_cfg.model.path = str(resolve_model_path(critic_cfg.model.path))
        critic = PolicyModel(critic_cfg, run.pmesh, value_head=True)
        value_fn = ValueLoss(cliprange_value=a.cliprange_value, vf_coef=a.vf_coef)
    eos_ids = [tokenizer.eos_id]
    skip_old_pass = old_from_training_forward(s)
    # The k samples of one prompt share it: one row per prompt, the prompt run once (online_batch.group_rows).
    # The sequence-level losses (RLOO, REINFORCE) sum per sample; GRPO only with token_mean, as its other
    # aggregations count rows. PPO (per-token values) keeps one row per sample; so does pipeline parallelism
    # (fixed stage shapes).
    grouped_rows = (getattr(a, "shared_prompt", False) and s.k > 1 and policy.pp_size == 1
                    and (s.sequence_level or a.loss_type == "token_mean"))
    per_row = s.k if grouped_rows else 1
    loss_fn = PolicyGradientLoss(
        temperature=s.temperature, cliprange=s.cliprange, cliprange_high=s.cliprange_high,
        sequence_level=s.sequence_level, aggregation=getattr(a, "loss_type", "token_mean"),
        normaliser=float(s.max_new_tokens), kl_beta=s.kl_coef if algorithm == "grpo" else 0.0,
        old_from_forward=skip_old_pass, examples_per_row=per_row)
    sampler = ResumableDistributedSampler(len(prompts), policy.dp_rank, policy.dp_size,
                                          cfg.trainer.global_batch_size, seed=cfg.trainer.seed)
    total = total_steps_of(cfg, sampler.steps_per_epoch)
    sample_every = max(1, total // max(1, s.num_sample_generations))

    def logps_of(model_forward, batch, grouped) -> torch.Tensor:
        """Per-token log-probs ``[N, T]`` of the rollout rows ``batch``, computed on ``grouped`` when given."""
        rows = grouped if grouped is not None else batch
        logps = model_forward(rows, TokenLogps(s.temperature, rows["labels"].shape[1], per_row),
                              micro_batch_size=s.forward_batch_size).cpu()
        return from_group_layout(logps, batch, grouped) if grouped is not None else logps

    def score(indices: list[int], rollouts, texts: list[str], batch) -> tuple[torch.Tensor, dict[str, float]]:
        n = len(texts)
        total_score = torch.zeros(n, dtype=torch.float64)
        parts: dict[str, float] = {}
        if reward_fns is not None:
            rows = [i for i in indices for _ in range(s.k)]
            prompt_text = [prompts.records[i]["prompt"] for i in rows]
            fn_total, per_fn = reward_fns(prompt_text, texts, prompts.columns(rows))
            total_score += fn_total.double()
            for name, values in per_fn.items():
                finite = torch.isfinite(values)
                parts[f"rewards/{name}/mean_sum"] = float(values[finite].sum())
                parts[f"rewards/{name}/sq_sum"] = float((values[finite] ** 2).sum())
        if reward_model is not None:
            rm = reward_model.forward(batch, lambda v, mb: last_token_values(v, mb["attention_mask"]),
                                      micro_batch_size=s.forward_batch_size).cpu().double()
            total_score += weights[-1] * rm
            parts["rewards/reward_model/mean_sum"] = float(rm.sum())
            parts["rewards/reward_model/sq_sum"] = float((rm ** 2).sum())
        if s.missing_eos_penalty is not None:
            no_eos = torch.tensor([r != "eos" for r in rollouts.finish_reasons])
            total_score -= s.missing_eos_penalty * no_eos.double()
        return total_score.float(), parts

    generated = {"tokens": float("nan")}  # completion tokens of the last step: train/tokens_per_sec counts them

    def step_fn(indices: list[int], step: int) -> dict[str, float]:
        timers: dict[str, float] = {}
        t0 = time.perf_counter()
        policy.prepare_for_inference()  # the engine's memory back and its weights refit after the last update
        timers["time/refit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # Seeded by step and keyed by each prompt's place in the global batch: the same draws after a resume
        # and at any number of data-parallel ranks.
        seed = (cfg.trainer.seed * 1_000_003 + step) % (1 << 62)
        sampling = SamplingParams(temperature=s.temperature, top_k=cfg.generation.top_k, top_p=cfg.generation.top_p,
                                  max_new_tokens=s.max_new_tokens, min_new_tokens=cfg.generation.min_new_tokens,
                                  stop_token_ids=stop_token_ids,
                                  stop_strings=list(cfg.generation.stop_strings), n=s.k, seed=seed,
                                  ignore_eos=ignore_eos,
                                  prompt_index_offset=policy.dp_rank * len(indices))
        rollouts = policy.generate([prompts.token_ids[i] for i in indices], sampling)
        policy.finish_inference()
        timers["time/generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        batch = rollout_batch(rollouts, tokenizer.pad_id)
        texts = response_texts(rollouts, sampling, tokenizer, eos_ids)
        scores, reward_parts = score(indices, rollouts, texts, batch)
        timers["time/scoring"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mask = batch["labels"] != -100
        grouped = None
        if grouped_rows:
            grouped = group_rows(batch, [len(p) for p in rollouts.prompt_token_ids], s.k, tokenizer.pad_id)
            grouped["engine_logps"] = to_group_layout(batch["engine_logps"], batch, grouped)
        if reference is not None:
            with reference.swapped_in():
                batch["ref_logps"] = logps_of(policy.forward, batch, grouped)
        if skip_old_pass:
            # The training forward's own log-probs are the old ones, and the advantages do not depend on them
            # (old_from_training_forward): no KL in the reward, so it is the score alone.
            kl = torch.zeros_like(mask, dtype=torch.float32)
        else:
            batch["old_logps"] = logps_of(policy.forward, batch, grouped)
            rollout_sums = rollout_logprob_sums(batch["old_logps"], batch)
            kl = (batch["old_logps"] - batch.get("ref_logps", batch["old_logps"])) * mask  # k1 per token
        if critic is not None:
            values = critic.forward(batch, lambda v, mb: _plain(v)[..., 0].float(),
                                    micro_batch_size=s.forward_batch_size).cpu() * mask
            token_rewards = -s.kl_coef * kl
            final_token = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask  # each row's last response token
            token_rewards = token_rewards + final_token * scores.unsqueeze(-1)
            if a.whiten_rewards:
                token_rewards = whiten(token_rewards, mask, shift_mean=False)
            adv, returns = gae(token_rewards, values, mask, gamma=a.gamma, lam=a.lam)
            adv = whiten(adv, mask) * mask
            batch.update(advantages=adv, old_values=values, returns=returns)
        else:
            rewards = sequence_rewards(s, scores, kl.sum(-1))
            adv = advantages_of(s, rewards, a)
            batch["advantages"] = adv.unsqueeze(-1).expand_as(mask).float().contiguous()
        timers["time/reference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = len(texts)
        train_rows = batch
        if grouped is not None:  # the per-token tensors the loss reads, in the grouped rows
            train_rows = {**grouped, **{key: to_group_layout(batch[key], batch, grouped)
                                        for key in ("advantages", "old_logps", "ref_logps") if key in batch}}
        stats: dict[str, float] = {}
        last: dict[str, float] = {}
        generator = torch.Generator().manual_seed(seed + policy.dp_rank)
        for _ in range(s.epochs):
            # Mini-batches of samples, or of whole prompts' groups of samples in the grouped rows.
            order = torch.randperm(train_rows["tokens"].shape[0], generator=generator)
            for part in order.chunk(s.num_mini_batches):
                mb = {key: v[part] for key, v in train_rows.items()}
                last = policy.train_step(mb, loss_fn)
                if critic is not None:
                    last = {**{f"critic_{k}": v for k, v in critic.train_step(mb, value_fn).items()}, **last}
                for key, v in last.items():
                    stats[key] = stats.get(key, 0.0) + v
        updates = s.epochs * s.num_mini_batches
        stats = {key: v / updates for key, v in stats.items()}
        timers["time/training"] = time.perf_counter() - t0
        # Per-row sums, averaged over the global batch.
        lengths = mask.sum(-1).double()
        row_sums = {
            "objective/scores": float(scores.sum()), "objective/scores_sq": float((scores.double() ** 2).sum()),
            "val/num_eos_tokens": float(sum(r == "eos" for r in rollouts.finish_reasons)) * 1.0,
            "rollout/response_length": float(lengths.sum()),
            "frac_reward_zero_std": float((scores.reshape(-1, s.k).std(-1) == 0).sum()) * s.k,
            **reward_parts,
        }
        if skip_old_pass:
            # train_step divided the loss's sums by the loss units of the global batch; their mean per row
            # turns them into means over rows.
            row_sums["loss_units_sum"] = float(loss_fn.num_units(batch))
        else:
            row_sums.update({key: float(v) for key, v in rollout_sums.items()})
        means = _mean_over_dp(policy, row_sums, float(n))
        if skip_old_pass:
            means.update({key: v * means["loss_units_sum"] for key, v in stats.items() if key.startswith("rollout_")})
        out = {key: v for key, v in means.items() if not key.endswith(("_sum", "_sq"))}
        out.update(rollout_statistics(means, s.kl_coef))
        out["val/num_eos_tokens"] = means["val/num_eos_tokens"] * n * policy.dp_size  # a count, as TRL logs it
        var = means["objective/scores_sq"] - means["objective/scores"] ** 2
        out["objective/scores_std"] = max(var, 0.0) ** 0.5
        for key in [k for k in means if k.endswith("/mean_sum")]:
            name = key[: -len("/mean_sum")]
            out[f"{name}/mean"] = means[key]
            out[f"{name}/std"] = max(means[f"{name}/sq_sum"] - means[key] ** 2, 0.0) ** 0.5
        ratio = stats.get("ratio", 1.0)
        out.update({
            "policy/approxkl_avg": stats.get("approxkl", 0.0), "policy/clipfrac_avg": stats.get("clipfrac", 0.0),
            "loss/policy_avg": stats.get("policy_loss", 0.0), "policy/entropy_avg": stats.get("entropy", 0.0),
            "val/ratio": ratio, "val/ratio_var": max(stats.get("ratio_sq", 1.0) - ratio ** 2, 0.0),
            "lr": last.get("lr", 0.0), "train/grad_norm": stats.get("grad_norm", 0.0), **timers,
            "episode": float(step * cfg.trainer.global_batch_size * s.k),
        })
        if "kl" in stats:
            out["loss/kl_avg"] = stats["kl"]
        if critic is not None:
            out["loss/value_avg"] = stats["critic_value_loss"]
            out["val/clipfrac_avg"] = stats["critic_vf_clipfrac"]
        generated["tokens"] = means["rollout/response_length"] * n * policy.dp_size  # the step's, all ranks
        elapsed = sum(timers.values())
        out["eps"] = cfg.trainer.global_batch_size * s.k / elapsed if elapsed > 0 else 0.0
        warn_about_kl(run, step, out)
        if run.is_main and (step % sample_every == 0 or step == 1):
            rows = [(json_prompt(prompts.records[indices[i // s.k]]["prompt"]), texts[i], f"{float(scores[i]):.3f}")
                    for i in range(min(SAMPLE_ROWS, n))]
            run.print(format_sample_table(rows, headers=("query", "response", "score")))
            save_samples(run.output_dir, step, rows, headers=("query", "response", "score"))
        return out

    hooks = Hooks(step=step_fn, optimizer_steps_per_step=s.epochs * s.num_mini_batches,
                  step_tokens=lambda indices: generated["tokens"], extra_models={"critic": critic} if critic else {})
    if critic is not None:
        critic.set_total_steps(total * s.epochs * s.num_mini_batches)
    return run_training(run, policy, SamplerBatches(sampler), loss_fn, hooks, model_dir=model_dir)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def json_prompt(prompt: Any) -> str:
    """A prompt for the sample table: the text, or the last user turn of a message list."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def warn_about_kl(run, step: int, metrics: dict[str, float]) -> None:
    """The FAQ's safeguard: KL outside [0, 10] or negative usually comes from how the rollouts were drawn."""
    kl = metrics["objective/kl"]
    lo, hi = KL_WARN_RANGE
    if kl < lo or metrics.get("objective/negative_kl_frac", 0.0) > 0.5:
        run.print(f"warning: step {step}: objective/kl={kl:.4f} is negative: the rollout tokens were not drawn from "
                  f"the policy's softmax(logits / temperature). Check generation.top_k=0, generation.top_p=1.0, "
                  f"generation.min_new_tokens=0 and that the temperature matches (docs/debugging-rl.md)")
    elif kl > hi:
        run.print(f"warning: step {step}: objective/kl={kl:.2f} is above {hi:g}: the policy is drifting far from "
                  f"the reference (reward hacking?); raise the KL coefficient or lower the learning rate, and look "
                  f"at the sample table (docs/debugging-rl.md)")


def main(argv: list[str] | None = None, algorithm: str = "grpo") -> int:
    """Entry point of ``examples/train_<algorithm>.py`` and ``aligner train <algorithm>``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = algorithm
    if argv and "=" not in argv[0]:
        config = argv.pop(0)
    train_online(algorithm, load_config(config, argv))
    return 0


if __name__ == "__main__":
    from aligner.parallel.process_exit import exit_after

    exit_after(main)
