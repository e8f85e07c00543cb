"""`rows.thinking_plan`: the thinking-budget bookkeeping `Generator.chat` and the server share."""

from __future__ import annotations

import pytest

from edgepipe.runtime.chat import opens_thinking
from edgepipe.runtime.rows import thinking_plan

OPEN = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
CLOSED = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PLAIN = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_opens_thinking_only_for_a_generation_prompt_ending_inside_the_block():
    assert opens_thinking(OPEN)
    assert not opens_thinking(CLOSED) and not opens_thinking(PLAIN)
    # A <think> in an earlier turn does not count.
    assert not opens_thinking("<|im_start|>assistant\n<think>\n" + PLAIN)


def test_a_plan_has_the_qwen3_ids_and_whether_the_prompt_started_thinking(qwen3_tokenizer):
    plan = thinking_plan(qwen3_tokenizer, OPEN, None, 7)
    assert plan.budget == 7 and plan.started
    assert plan.open_id == qwen3_tokenizer.token_to_id("<think>")
    assert plan.close_id == qwen3_tokenizer.token_to_id("</think>")
    assert qwen3_tokenizer.decode(plan.close_ids, skip_special_tokens=False) == "</think>\n\n"
    assert not thinking_plan(qwen3_tokenizer, PLAIN, True, 7).started


def test_no_plan_without_a_budget_or_with_thinking_off(qwen3_tokenizer):
    assert thinking_plan(qwen3_tokenizer, OPEN, None, None) is None
    assert thinking_plan(qwen3_tokenizer, OPEN, False, 7) is None


@pytest.mark.parametrize("budget", [-1, 1.5, True, "8"])
def test_a_bad_budget_is_refused_naming_it(qwen3_tokenizer, budget):
    with pytest.raises(ValueError, match="thinking_budget must be an int >= 0"):
        thinking_plan(qwen3_tokenizer, OPEN, None, budget)


def test_a_budget_needs_a_think_token(qwen_tokenizer_dir):
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    assert tokenizer.token_to_id("</think>") is None  # Qwen2.5's vocabulary
    with pytest.raises(ValueError, match="</think>"):
        thinking_plan(tokenizer, PLAIN, None, 4)
