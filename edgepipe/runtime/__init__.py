"""edgepipe.runtime: run an edgepipe artifact with onnxruntime, numpy, tokenizers and jinja2.

    from edgepipe.runtime import Generator
    gen = Generator("artifacts/qwen3-0.6b-cpu")
    print(gen.generate("The capital of France is", max_new_tokens=16).text)
    for piece in gen.stream("Tell me a story"):
        print(piece, end="", flush=True)
    reply = gen.chat([{"role": "user", "content": "Hi"}], enable_thinking=False)

Importing this package loads none of torch, transformers, onnx or the build side; onnxruntime and
tokenizers are imported when a `Generator` is created.
"""

from edgepipe.runtime.artifact import Artifact, load_artifact
from edgepipe.runtime.chat import ChatTemplate, split_thinking
from edgepipe.runtime.errors import (
    ArtifactError,
    GeneratorError,
    InvalidPrompt,
    KVCacheFull,
    PromptTooLong,
    ProviderUnavailable,
    TemplateRefused,
)
from edgepipe.runtime.generator import GenerationResult, Generator, Metrics, Stream
from edgepipe.runtime.sampling import SamplingParams
from edgepipe.runtime.session import ChatSession

__all__ = [
    "Artifact",
    "ArtifactError",
    "ChatSession",
    "ChatTemplate",
    "GenerationResult",
    "Generator",
    "GeneratorError",
    "InvalidPrompt",
    "KVCacheFull",
    "Metrics",
    "PromptTooLong",
    "ProviderUnavailable",
    "SamplingParams",
    "Stream",
    "TemplateRefused",
    "load_artifact",
    "split_thinking",
]
