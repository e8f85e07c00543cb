"""Shared fixtures. Each fixture family lives in tests/fixtures/ and is loaded here as a plugin."""

pytest_plugins = [
    "tests.fixtures.tokenizer",
    "tests.fixtures.models",
    "tests.fixtures.static",
    "tests.fixtures.serve",
]
