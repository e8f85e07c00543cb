"""Model architectures: the family machinery (`spec`), one data-only module per family
(`qwen2`, `qwen3`), their registry (`families`), random-weight presets, the tokenizer and chat
templates."""
