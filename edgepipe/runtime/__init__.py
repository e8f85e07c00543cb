"""edgepipe.runtime: run an edgepipe artifact with onnxruntime, numpy, tokenizers and jinja2.

    from edgepipe.runtime import Generator
    gen = Generator("artifacts/qwen3-0.6b-cpu")
    print(gen.generate("The capital of France is", max_new_tokens=16).text)
    for piece in gen.stream("Tell me a story"):
        print(piece, end="", flush=True)
    reply = gen.chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    person = gen.generate("Name a person as JSON:", json_schema=schema)  # edgepipe[constrained]
    reply = gen.chat(messages, tools=tools)  # reply.tool_calls: [ToolCall(id, name, arguments)]

Importing this package loads none of torch, transformers, onnx or the build side; onnxruntime and
tokenizers are imported when a `Generator` is created; llguidance only when a constraint is asked
for.
"""

from edgepipe.runtime.artifact import Artifact, load_artifact
from edgepipe.runtime.chat import ChatTemplate, split_thinking
from edgepipe.runtime.errors import (
    ArtifactError,
    ConstraintUnavailable,
    GeneratorError,
    InvalidConstraint,
    InvalidPrompt,
    KVCacheFull,
    PromptTooLong,
    ProviderUnavailable,
    TemplateRefused,
)
from edgepipe.runtime.generator import Generator
from edgepipe.runtime.results import GenerationResult, Metrics, Stream
from edgepipe.runtime.sampling import SamplingParams
from edgepipe.runtime.session import ChatSession
from edgepipe.runtime.tools import ToolCall, parse_tool_calls

__all__ = [
    "Artifact",
    "ArtifactError",
    "ChatSession",
    "ChatTemplate",
    "ConstraintUnavailable",
    "GenerationResult",
    "Generator",
    "GeneratorError",
    "InvalidConstraint",
    "InvalidPrompt",
    "KVCacheFull",
    "Metrics",
    "PromptTooLong",
    "ProviderUnavailable",
    "SamplingParams",
    "Stream",
    "TemplateRefused",
    "ToolCall",
    "load_artifact",
    "parse_tool_calls",
    "split_thinking",
]
