"""LLM-as-judge and meta-judge prompt templates and verdict parsing (no models). See docs/judges.md."""
from aligner.judges.parsing import DEFAULT_SCORE_REGEX, DEFAULT_WINNER_REGEX, parse_score, parse_winner
from aligner.judges.templates import (
    DEFAULT_JUDGE_TEMPLATE,
    DEFAULT_META_JUDGE_TEMPLATE,
    REQUIRED_VARIABLES,
    JudgeTemplate,
    TemplateError,
    load_template,
    render_judge_prompt,
    render_meta_judge_prompt,
)

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE", "DEFAULT_META_JUDGE_TEMPLATE", "DEFAULT_SCORE_REGEX", "DEFAULT_WINNER_REGEX",
    "REQUIRED_VARIABLES", "JudgeTemplate", "TemplateError", "load_template", "parse_score", "parse_winner",
    "render_judge_prompt", "render_meta_judge_prompt",
]
