"""Qwen's special-token ids, shared by every Qwen2, Qwen2.5 and Qwen3 vocabulary.

The added tokens follow the 151643 BPE ranks in a fixed order (`edgepipe.arch.tokenizer`
lists them all); these are the ones the build writes into configs by id.
"""

from __future__ import annotations

# `<|endoftext|>` ends a document and pads; `<|im_start|>`/`<|im_end|>` open and close a chat
# turn; `<think>`/`</think>` bracket Qwen3's reasoning.
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
THINK_ID = 151667
END_THINK_ID = 151668

# What a chat model stops on, in the order genai and generation_config.json list them.
CHAT_EOS_IDS = (IM_END_ID, ENDOFTEXT_ID)
