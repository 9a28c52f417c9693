"""What the load tester sends: prompts files, arrivals, conversations."""

import random
import statistics

import pytest

from app.loadtest.workload import Conversation, poisson_arrivals, read_prompts_file, words_for_tokens


def test_prompts_file_one_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first?\n\n  \nsecond line\\nwith a newline\n")
    assert read_prompts_file(path) == ["first?", "second line\nwith a newline"]
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts_file(path)


def test_poisson_arrivals_have_the_asked_rate_and_repeat_with_a_seed():
    arrivals = poisson_arrivals(random.Random(7), 5000, qps=20.0)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert arrivals[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.1)  # exponential: stdev = mean
    assert poisson_arrivals(random.Random(7), 5000, qps=20.0) == arrivals
    assert poisson_arrivals(random.Random(7), 3, qps=None) == [0.0, 0.0, 0.0]


def test_words_for_tokens():
    assert words_for_tokens(100, 2.0) == 50
    assert words_for_tokens(1, 4.0) == 1


def test_a_conversation_sends_its_history_and_the_tag_opens_it():
    conv = Conversation("be brief", history=True)
    assert conv.messages("q1", tag="[t] ") == [
        {"role": "system", "content": "[t] be brief"},
        {"role": "user", "content": "q1"},
    ]
    conv.answered("q1", "a1")
    assert conv.messages("q2") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]


def test_without_history_or_system_prompt():
    conv = Conversation(None, history=False)
    conv.answered("q1", "a1")
    assert conv.messages("q2", tag="[t] ") == [{"role": "user", "content": "[t] q2"}]
    with_history = Conversation(None, history=True)
    assert with_history.messages("q1", tag="[t] ") == [{"role": "user", "content": "[t] q1"}]
    with_history.answered("q1", "a1")
    # Round 2 opens with the same tagged text as round 1: the prefix the engine cached.
    assert with_history.messages("q2", tag="[t] ")[0] == {"role": "user", "content": "[t] q1"}
