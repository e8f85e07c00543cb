"""Shared fixtures. Each fixture family lives in tests/fixtures/ and is loaded here as a plugin."""

import shutil

import pytest

pytest_plugins = [
    "tests.fixtures.tokenizer",
    "tests.fixtures.models",
    "tests.fixtures.static",
    "tests.fixtures.constrained",
    "tests.fixtures.lora",
    "tests.fixtures.serve",
]


@pytest.fixture(scope="session", autouse=True)
def _remove_temp_folders_after_a_passing_run(request, tmp_path_factory):
    """Delete this session's temporary folder (models, artifacts, caches: gigabytes) when every
    test passed; a failing run keeps it to look at (pyproject keeps the last one only)."""
    yield
    if request.session.testsfailed == 0:
        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)
