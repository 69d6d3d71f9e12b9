"""Judge and meta-judge templates: the shipped files, rendering, and load-time checks with their messages."""
from __future__ import annotations

import pytest

from aligner.judges import (
    DEFAULT_JUDGE_TEMPLATE, DEFAULT_META_JUDGE_TEMPLATE, DEFAULT_SCORE_REGEX, DEFAULT_WINNER_REGEX, TemplateError,
    load_template, parse_score, parse_winner, render_judge_prompt, render_meta_judge_prompt,
)


def test_defaults_ship_inside_the_package():
    assert DEFAULT_JUDGE_TEMPLATE.name == "judge.jinja" and DEFAULT_JUDGE_TEMPLATE.is_file()
    assert DEFAULT_META_JUDGE_TEMPLATE.name == "meta_judge.jinja" and DEFAULT_META_JUDGE_TEMPLATE.is_file()
    assert DEFAULT_JUDGE_TEMPLATE.parent.parent.name == "judges"
    judge, meta = load_template(None, "judge"), load_template(None, "meta_judge")
    assert (judge.path, judge.kind) == (DEFAULT_JUDGE_TEMPLATE, "judge")
    assert (meta.path, meta.kind) == (DEFAULT_META_JUDGE_TEMPLATE, "meta_judge")


def test_judge_prompt_from_string():
    text = render_judge_prompt(load_template(None, "judge"), "What is 2 + 2?", "It is 4.")
    assert "<question>\nWhat is 2 + 2?\n</question>" in text
    assert "<response>\nIt is 4.\n</response>" in text
    assert text.endswith("Score: <points>\n")  # the file's final newline is kept
    assert text.count("\n1. ") == 1 and "\n5. Expert" in text  # the five rubric points
    # A judge that only echoes its instructions has no score.
    assert parse_score(text, DEFAULT_SCORE_REGEX, 0, 5) is None


def test_judge_prompt_from_messages_uses_last_user_turn():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"}]
    text = render_judge_prompt(load_template(None, "judge"), messages, "resp")
    assert "<question>\nsecond question\n</question>" in text and "first question" not in text


def test_custom_template_sees_messages(tmp_path):
    path = tmp_path / "judge.jinja"
    path.write_text("{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}|{{ prompt }}|{{ response }}")
    template = load_template(str(path), "judge")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render_judge_prompt(template, messages, "R") == "system=S;user=Q;|Q|R"
    assert render_judge_prompt(template, "Q2", "R") == "user=Q2;|Q2|R"


def test_meta_judge_prompt():
    text = render_meta_judge_prompt(load_template(None, "meta_judge"), "Q?", "resp", "judge one", "judge two")
    assert text.index("<question>\nQ?\n") < text.index("<response>\nresp\n") < text.index("judge one") \
        < text.index("judge two")
    assert "<judgement_a>\njudge one\n</judgement_a>" in text and "<judgement_b>\njudge two\n</judgement_b>" in text
    assert text.endswith("Winner: Judgement A\nWinner: Judgement B\n")
    assert parse_winner("Reasons...\nWinner: Judgement A", DEFAULT_WINNER_REGEX) == 0


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.jinja"
    with pytest.raises(TemplateError, match=rf"^{path}: no such file; .*built-in judge.jinja"):
        load_template(path, "judge")
    with pytest.raises(TemplateError, match="is a directory"):
        load_template(tmp_path, "meta_judge")


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jinja"
    path.write_text("{{ prompt }}\n{{ response }}\n{% if x %}unclosed\n")
    with pytest.raises(TemplateError) as e:
        load_template(path, "judge")
    assert str(e.value).startswith(f"{path}:")
    assert "Jinja syntax error" in str(e.value)
    path.write_text("line one {{ prompt }}\nline two {{ response }}\nline three {{ oops( }}\n")
    with pytest.raises(TemplateError, match=rf"^{path}:3: Jinja syntax error"):
        load_template(path, "judge")


@pytest.mark.parametrize("kind, body, missing", [
    ("judge", "{{ prompt }}", "response"),
    ("judge", "{{ messages }} {{ response }}", "prompt"),
    ("meta_judge", "{{ prompt }} {{ response }} {{ judgement_a }}", "judgement_b"),
    ("meta_judge", "{{ prompt }} {{ response }}", "judgement_a, judgement_b"),
])
def test_required_variables(tmp_path, kind, body, missing):
    path = tmp_path / "t.jinja"
    path.write_text(body)
    with pytest.raises(TemplateError, match=rf"^{path}: the {kind} template never uses {missing};"):
        load_template(path, kind)


def test_variable_in_a_branch_counts_as_used(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% if response %}{{ prompt }}: {{ response }}{% endif %}")
    assert load_template(path, "judge").render(prompt="p", response="") == ""


def test_unknown_variable_fails_at_render(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ prompt }} {{ response }} {{ rubric }}")
    template = load_template(path, "judge")
    expected = rf"^{path}: cannot render the judge template: 'rubric' is undefined \(given: messages, prompt, response\)"
    with pytest.raises(TemplateError, match=expected):
        render_judge_prompt(template, "p", "r")


def test_kind_checks():
    with pytest.raises(ValueError, match="unknown judge template kind 'meta'"):
        load_template(None, "meta")
    with pytest.raises(TemplateError, match="render_meta_judge_prompt needs a meta_judge template"):
        render_meta_judge_prompt(load_template(None, "judge"), "p", "r", "a", "b")
    with pytest.raises(ValueError, match="no user turn"):
        render_judge_prompt(load_template(None, "judge"), [{"role": "system", "content": "s"}], "r")
    assert issubclass(TemplateError, ValueError)
