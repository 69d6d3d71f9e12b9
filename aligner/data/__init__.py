"""Data pipeline: read and validate records, tokenize SFT chats (loss on assistant tokens), pack, collate,
cache, and a resumable data-parallel sampler. See docs/data.md."""
from aligner.data.collate import IGNORE_INDEX, collate, collate_shared_prompt, pad_rows, shift_labels
from aligner.data.dataset import HoldOut, SFTData, build_sft_data, build_sft_datasets, split_records
from aligner.data.errors import DataError
from aligner.data.example import TokenizedExample
from aligner.data.formats import FORMATS, ROLES, prompt_messages, sft_messages, validate_record, validate_records
from aligner.data.packing import pack_examples
from aligner.data.readers import read_records
from aligner.data.sampler import ResumableDistributedSampler
from aligner.data.sft import SFTStats, assistant_segments, tokenize_conversation, tokenize_sft

__all__ = [
    "FORMATS", "IGNORE_INDEX", "ROLES", "DataError", "HoldOut", "ResumableDistributedSampler", "SFTData", "SFTStats",
    "TokenizedExample", "assistant_segments", "build_sft_data", "build_sft_datasets", "collate",
    "collate_shared_prompt", "pack_examples", "pad_rows",
    "prompt_messages", "read_records", "sft_messages", "shift_labels", "split_records", "tokenize_conversation",
    "tokenize_sft", "validate_record", "validate_records",
]

# Preference (RM, DPO family) and KTO data; see docs/data.md "Preference and KTO data".
from aligner.data.preference import KTOStats, PreferenceStats, tokenize_kto, tokenize_preference  # noqa: E402
from aligner.data.preference_dataset import (  # noqa: E402
    KTOData,
    PreferenceData,
    build_kto_data,
    build_kto_datasets,
    build_preference_data,
    build_preference_datasets,
    seeded_derangement,
)

__all__ += [
    "KTOData", "KTOStats", "PreferenceData", "PreferenceStats", "build_kto_data", "build_kto_datasets",
    "build_preference_data", "build_preference_datasets", "seeded_derangement", "tokenize_kto", "tokenize_preference",
]
