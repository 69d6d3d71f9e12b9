"""The rollout engine a PolicyModel owns: built on the first ``generate``, refit after the weights change,
its memory released between rollouts.

The engine is built from ``job_cfg.generation`` (a :class:`aligner.config.GenerationConfig`; defaults when
the job has no such section) or from what :meth:`PolicyRolloutEngine.configure` was given. The built-in
backend runs through :func:`aligner.generation.parallel.build_parallel_engine` at the policy's parallel
layout (one process included); TensorRT-LLM gets the policy itself (it refits from our parameter names).

Refit is lazy and exact: ``train_step`` and ``load_state_dict`` mark the weights changed, and the next
``prepare_for_inference`` (or, failing that, the next ``generate``) calls ``update_weights`` once.
"""
from __future__ import annotations

from typing import Any, Sequence

from aligner.config import GenerationConfig
from aligner.generation import build_engine
from aligner.generation.engine import GenerationEngine, Rollouts, SamplingParams
from aligner.generation.parallel import build_parallel_engine


class PolicyRolloutEngine:
    """Engine ownership for one :class:`aligner.wrappers.PolicyModel` (its ``rollout`` attribute)."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.generation: GenerationConfig = getattr(policy.job_cfg, "generation", None) or GenerationConfig()
        self.tokenizer: Any = None  # a ChatTokenizer or EOS ids; None: from model.path or the model config
        self.engine: GenerationEngine | None = None
        self._weights_changed = False
        self._loaded = True  # between prepare_for_inference and finish_inference (or never offloaded)

    def configure(self, generation: GenerationConfig | None = None, tokenizer: Any = None) -> None:
        """Use these settings from the next ``generate`` on (an engine already built is closed)."""
        if generation is not None:
            self.generation = generation
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self.close()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None) -> Rollouts:
        """Rollouts of this data-parallel rank's prompts (token ids); ``sampling`` defaults to the config's."""
        if prompts and isinstance(prompts[0], str):
            raise TypeError("PolicyModel.generate takes token ids (one list per prompt), not text; tokenize the "
                            "prompts first, e.g. tokenizer.encode(tokenizer.apply_chat_template(messages, "
                            "add_generation_prompt=True))")
        sampling = sampling if sampling is not None else self.generation.sampling_params()
        engine = self._engine()
        if not self._loaded:
            engine.onload()
            self._loaded = True
        self._refit_if_changed()
        return engine.generate(prompts, sampling)

    def weights_changed(self) -> None:
        """The policy's weights moved (optimizer step, checkpoint load): refit before the next rollout."""
        self._weights_changed = True

    def onload(self) -> None:
        """Before rollouts: the engine's memory back, and the refit if the weights changed (collective)."""
        if self.engine is None:
            return
        if not self._loaded:
            self.engine.onload()
            self._loaded = True
        self._refit_if_changed()

    def offload(self) -> None:
        """After rollouts: release the engine's KV caches (and PP copy) for training."""
        if self.engine is not None and self._loaded:
            self.engine.offload()
            self._loaded = False

    def close(self) -> None:
        """Free the engine; the next ``generate`` builds a new one."""
        if self.engine is not None:
            self.engine.close()
        self.engine, self._loaded, self._weights_changed = None, True, False

    # ------------------------------------------------------------------- internals
    def _refit_if_changed(self) -> None:
        if self._weights_changed:
            # The built-in engine reads the stages it was built on; TensorRT-LLM is sent the model.
            self.engine.update_weights(None if self.generation.backend == "torch" else self.policy.model)
            self._weights_changed = False

    def _engine(self) -> GenerationEngine:
        if self.engine is None:
            tokenizer = self._tokenizer()
            if self.generation.backend == "torch":
                self.engine = build_parallel_engine(self.policy.stages, self.policy.pmesh, self.generation, tokenizer)
            else:
                self.engine = build_engine(self.policy, self.generation, tokenizer)
            self._weights_changed = False  # a new engine reads the current weights
        return self.engine

    def _tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        path = self.policy.job_cfg.model.path
        if path:
            from aligner.models.tokenizer import load_tokenizer  # noqa: PLC0415

            return load_tokenizer(path)
        eos = self.policy.config.eos_token_id
        if eos is None:
            raise ValueError("the policy has no tokenizer (model.path is null) and its model.arch has no "
                             "eos_token_id; call policy.configure_generation(tokenizer=...) with a tokenizer "
                             "or a list of EOS token ids")
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

