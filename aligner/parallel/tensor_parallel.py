"""Megatron-style tensor parallelism for the Transformer, as DTensor ``parallelize_module`` plans.

Attention and MLP follow the classic split: q/k/v and gate/up are column-parallel (each rank owns a
slice of the heads / of the intermediate dim), o and down are row-parallel (partial sums reduced on
the way out). The embedding is row-parallel over the vocabulary, the LM head column-parallel over the
vocabulary (logits stay vocab-sharded for ``aligner.parallel.vocab_parallel``).

With sequence parallelism the residual stream between blocks is a DTensor sharded on the sequence
dim (``Shard(1)``): norms run on ``T / tp`` tokens, the all-reduce after o/down becomes a
reduce-scatter and the input of attention/MLP an all-gather. Keeping the residual stream a DTensor
(rather than a local tensor) means ``Transformer.forward`` sees the global ``[B, T, D]`` shape, so
positions and masks are built for the whole sequence with no change to the model.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from aligner.models.heads import has_value_head


def check_tensor_parallel_divisibility(cfg, tp: int) -> None:
    """Raise a ValueError naming ``parallel.tp`` when a sharded dim of ``cfg`` does not divide by ``tp``."""
    rules = [
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("intermediate_size", cfg.intermediate_size),
        ("vocab_size", cfg.vocab_size),
    ]
    bad = [f"{name}={value}" for name, value in rules if value % tp]
    if bad:
        valid = [d for d in range(1, cfg.num_key_value_heads + 1)
                 if all(v % d == 0 for _, v in rules)]
        raise ValueError(
            f"parallel.tp={tp} does not divide the model's {', '.join(bad)}; tensor parallelism "
            f"splits heads, KV heads, the MLP and the vocabulary evenly. Valid parallel.tp values: {valid}"
        )


def _block_plan(sequence_parallel: bool, qk_norm: bool) -> dict:
    """The plan of one TransformerBlock (names relative to the block)."""
    # Under SP the block input is a Shard(1) DTensor; o/down reduce-scatter back to Shard(1) and keep
    # the DTensor so the residual add stays a DTensor op. Without SP everything between blocks is a
    # plain replicated tensor.
    seq = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=seq, use_local_output=not sequence_parallel),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=seq, use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            # Attention is called as (x, cos, sin, mask, input_pos): only x is gathered.
            "self_attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None),
                use_local_output=True,
            ),
            "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
        })
    if qk_norm:
        # q/k norm act per head on this rank's heads ([B, T, H/tp, hd]); the weight is shared by all
        # heads, so its gradient is a sum over heads held by different ranks. Treating the head dim
        # as the sharded dim (Shard(2)) lets DTensor reduce that gradient over tp.
        plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
) -> nn.Module:
    """Shard ``model`` (a Transformer or one pipeline stage of it) over the 1-D ``tp_mesh``, in place.

    Args:
        model: the Transformer; ``tok_embeddings``, ``norm``, ``output`` may be None and ``layers`` may
            hold only some of the layers (pipeline stages).
        tp_mesh: the ``tp`` sub-mesh.
        sequence_parallel: shard norms and the residual stream over the sequence dim (needs ``T``
            divisible by tp for even shards; uneven works but pads).
        loss_parallel: leave logits as a DTensor sharded on the vocab dim (``[B, T, V/tp]`` per rank);
            use ``aligner.parallel.vocab_parallel`` on them. Otherwise logits are gathered (plain tensor).

    Returns:
        ``model`` itself. Under SP, a stage without embeddings takes, and a stage without output
        returns, the local sequence shard ``[B, T/tp, D]`` as a plain tensor (pipeline boundaries).
    """
    tp = tp_mesh.size()
    check_tensor_parallel_divisibility(model.config, tp)
    seq = Shard(1) if sequence_parallel else Replicate()
    embed, head = model.tok_embeddings, model.output
    tied = embed is not None and head is not None and head.weight is embed.weight
    root_plan: dict = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=seq, use_local_output=not sequence_parallel
        )
    if model.norm is not None and sequence_parallel:
        root_plan["norm"] = SequenceParallel()
    if model.output is not None:
        if has_value_head(model):
            # The scalar head is tiny: keep it whole on every rank and give it the full sequence.
            if sequence_parallel:
                root_plan["output"] = PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
                )
        else:
            root_plan["output"] = ColwiseParallel(
                input_layouts=seq,
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            )
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    block_plan = _block_plan(sequence_parallel, model.config.qk_norm)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)
    if tied:
        # parallelize_module gives each module its own new Parameter; both are Shard(0) of the same
        # [V, D] matrix (rowwise over vocab for the embedding, colwise over vocab for the head), so
        # re-pointing the head at the embedding's parameter restores the tie shard for shard.
        model.output.weight = model.tok_embeddings.weight
    if sequence_parallel:
        # Pipeline-stage boundaries carry plain local sequence shards; inside, the stream is a DTensor.
        if model.tok_embeddings is None:
            parallelize_module(model, tp_mesh, PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),)))
        if model.output is None:
            parallelize_module(model, tp_mesh, PrepareModuleOutput(
                output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=True))
    return model

