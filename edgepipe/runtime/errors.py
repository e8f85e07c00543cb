"""Errors the runtime raises on purpose.

The runtime keeps its own small error classes instead of importing `edgepipe.errors`: an embedded
app that installs only `edgepipe` (the runtime) should be able to catch one base class,
`GeneratorError`, without learning the build side's vocabulary (every class here derives from it
and is exported from `edgepipe.runtime`). The CLI maps `GeneratorError` to exit code 2. Invalid
generation parameters raise plain `ValueError` (naming the parameter and its allowed range), as
the Python convention for a bad argument value.
"""

from __future__ import annotations


class GeneratorError(Exception):
    """Base class for every error `edgepipe.runtime` raises on purpose."""


class ArtifactError(GeneratorError):
    """A file of the artifact folder is missing, unreadable or fails its checksum.

    Attributes:
        path: the offending file (or the folder, when the folder itself is missing).
    """

    def __init__(self, path, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class ProviderUnavailable(GeneratorError):
    """The execution provider the artifact was built for is not installed."""


class PromptTooLong(GeneratorError, ValueError):
    """The prompt does not fit the model's context (or the `max_length` cap).

    Also a `ValueError`, so callers treating it as a bad argument keep working.
    """


class KVCacheFull(GeneratorError):
    """The fixed KV cache of a static artifact has no slot for the next token.

    `Generator` sizes every request to stay inside the cache, so only code that drives
    `edgepipe.runtime.engines.static.StaticPipeline` directly sees it.
    """


class TemplateRefused(GeneratorError, ValueError):
    """The chat template called `raise_exception(...)` (e.g. for a message it cannot render).

    Also a `ValueError`, as it was before it joined `GeneratorError`.
    """


class ConstraintUnavailable(GeneratorError, ImportError):
    """Constrained decoding was asked for but llguidance is not installed.

    Also an `ImportError`: the message has the `pip install` that fixes it.
    """


class InvalidConstraint(GeneratorError, ValueError):
    """A schema, regex or choice list that cannot constrain generation (found before it starts).

    Also a `ValueError`, as a bad argument.
    """


class InvalidPrompt(GeneratorError, ValueError):
    """A prompt the model cannot take: text that is not valid Unicode (a lone surrogate, e.g.
    from undecodable bytes), or a token id outside the vocabulary.

    Also a `ValueError`, like every other bad argument value.
    """
