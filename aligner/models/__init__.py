"""The Llama-family model, its heads, and Hugging Face / GGUF checkpoint conversion."""
from aligner.models.args import TransformerConfig, config_from_hf, config_to_hf
from aligner.models.heads import ValueHead, attach_value_head, has_value_head
from aligner.models.transformer import Transformer


def from_pretrained(path, dtype="float32", device="cpu"):
    """Load a Hugging Face checkpoint directory into a :class:`Transformer` (see ``aligner.models.hf``)."""
    from aligner.models.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, dtype=dtype, device=device)


__all__ = ["Transformer", "TransformerConfig", "ValueHead", "attach_value_head", "config_from_hf",
           "config_to_hf", "from_pretrained", "has_value_head"]
