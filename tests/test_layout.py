"""The package layout rules of docs/architecture.md, checked on the source with `ast`.

The first tests run the checks of tests/fixtures/layout.py on this checkout; the rest run them
on tiny synthetic trees, so a check that stopped finding anything would fail here too.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.fixtures.layout import (
    cross_test_imports,
    import_cycles,
    private_attributes,
    private_imports,
    runtime_boundary,
    scan,
    size_limits,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkout():
    return scan(REPO, ("edgepipe", "tests"))


def package_only(modules):
    return {n: m for n, m in modules.items() if n == "edgepipe" or n.startswith("edgepipe.")}


def report(violations) -> str:
    return f"{len(violations)} violation(s):\n" + "\n".join(map(str, violations))


def test_the_package_has_no_import_cycles(checkout):
    violations = import_cycles(checkout)
    assert not violations, report(violations)


def test_no_module_takes_a_private_name_from_another(checkout):
    violations = private_imports(checkout) + private_attributes(checkout)
    assert not violations, report(violations)


def test_the_runtime_imports_nothing_outside_the_runtime(checkout):
    violations = runtime_boundary(checkout)
    assert not violations, report(violations)


def test_modules_and_functions_stay_under_the_size_limits(checkout):
    violations = size_limits(package_only(checkout))
    assert not violations, report(violations)


def test_test_modules_take_shared_helpers_from_fixtures(checkout):
    violations = cross_test_imports(checkout)
    assert not violations, report(violations)


def test_the_scan_sees_the_whole_package(checkout):
    assert {"edgepipe", "edgepipe.runtime", "edgepipe.runtime.generator", "edgepipe.cli.main"} <= (
        set(checkout)
    )
    runtime_init = checkout["edgepipe.runtime"]
    assert runtime_init.is_package and runtime_init.imports, "the runtime's __init__ re-exports"


# -- the checks on synthetic trees -------------------------------------------------------


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import helper\n",
            "pkg/b.py": "def helper():\n    from pkg import a\n    return a\n",
            "pkg/c.py": "import pkg.a\n",
        },
    )
    (violation,) = import_cycles(scan(root, ("pkg",)))
    text = str(violation)
    assert "pkg.a -> pkg.b -> pkg.a" in text
    assert "b.py:2: pkg.b imports pkg.a (inside helper())" in text
    assert "pkg.c" not in text.split("edges:")[0], "c imports a but is in no cycle"


def test_a_cycle_through_a_package_init_and_relative_imports_is_found(tmp_path):
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "from .impl import run\n",
            "pkg/sub/impl.py": "from ..tools import clean\n\ndef run():\n    return clean\n",
            "pkg/tools.py": "import importlib\n\ndef clean():\n"
            "    return importlib.import_module('pkg.sub')\n",
        },
    )
    (violation,) = import_cycles(scan(root, ("pkg",)))
    assert "pkg.sub -> pkg.sub.impl -> pkg.tools -> pkg.sub" in str(violation)


def test_no_cycle_when_imports_only_go_one_way_or_are_for_type_checking(tmp_path):
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import f\n",
            "pkg/a.py": "from pkg import b\n\ndef f():\n    return b\n",
            "pkg/b.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
            "    from pkg.a import f\n",
        },
    )
    assert import_cycles(scan(root, ("pkg",))) == []


def test_a_private_name_imported_or_touched_across_modules_is_found(tmp_path):
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "_SECRET = 1\n__all__ = []\n\ndef _helper():\n    return _SECRET\n",
            "pkg/b.py": "from pkg.a import _helper, __all__\n",
            "pkg/c.py": "import pkg.a as a\n\nx = a._SECRET\n",
            "pkg/d.py": "from pkg import a\n\ndef patch(mp):\n"
            "    mp.setattr(a, '_SECRET', 2)\n    mp.setattr('pkg.a._helper', None)\n",
            "pkg/e.py": "import pkg.a\n\ny = pkg.a._helper()\n",
        },
    )
    modules = scan(root, ("pkg",))
    imported = [str(v) for v in private_imports(modules)]
    assert len(imported) == 1 and "b.py:1" in imported[0] and "_helper" in imported[0]
    touched = sorted(str(v) for v in private_attributes(modules))
    assert len(touched) == 4, touched
    assert "c.py:3" in touched[0] and "pkg.a._SECRET" in touched[0]
    assert "d.py:4" in touched[1] and "d.py:5" in touched[2] and "pkg.a._helper" in touched[2]
    assert "e.py:3" in touched[3]


def test_a_module_using_its_own_private_names_is_fine(tmp_path):
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import pkg.a as me\n\n_X = 1\n\nclass C:\n    def f(self):\n"
            "        return self._y, me._X\n",
        },
    )
    modules = scan(root, ("pkg",))
    assert private_imports(modules) == [] and private_attributes(modules) == []


def test_a_runtime_import_of_the_build_side_is_found_even_inside_a_function(tmp_path):
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/errors.py": "",
            "pkg/build/__init__.py": "",
            "pkg/build/run.py": "from pkg.runtime import gen\n",
            "pkg/runtime/__init__.py": "from pkg.runtime.gen import Generator\n",
            "pkg/runtime/gen.py": "from . import kv\n\nclass Generator:\n    def f(self):\n"
            "        from pkg.build.run import x\n        import pkg.errors\n",
            "pkg/runtime/kv.py": "",
        },
    )
    found = [str(v) for v in runtime_boundary(scan(root, ("pkg",)), runtime="pkg.runtime")]
    assert len(found) == 2, found
    assert "gen.py:5: pkg.runtime.gen imports pkg.build.run" in found[0]
    assert "gen.py:6: pkg.runtime.gen imports pkg.errors" in found[1]


def test_long_functions_and_modules_are_found_counting_from_def(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # 1 def line + 79 statements = 80 lines: at the limit, fine.
            "pkg/ok.py": f"@staticmethod\ndef fits():\n{body}",
            "pkg/long.py": "class K:\n    def method(self):\n"
            + textwrap.indent(body, "    ")
            + "        y = 0\n        z = 1\n",
            "pkg/big.py": "x = 1\n" * 601,
        },
    )
    found = sorted(str(v) for v in size_limits(scan(root, ("pkg",))))
    assert len(found) == 2, found
    assert "big.py:1" in found[0] and "601 lines" in found[0]
    assert "long.py:2" in found[1] and "method() has 82 lines" in found[1]


def test_an_import_from_another_test_module_is_found(tmp_path):
    root = tree(
        tmp_path,
        {
            "tests/__init__.py": "",
            "tests/fixtures/__init__.py": "",
            "tests/fixtures/toy.py": "",
            "tests/test_a.py": "from tests.fixtures.toy import build\n",
            "tests/test_b.py": "from tests.test_a import helper\n",
        },
    )
    (violation,) = cross_test_imports(scan(root, ("tests",)))
    assert "test_b.py:1" in str(violation) and "tests/fixtures/" in str(violation)


def test_a_module_alias_counts_only_in_the_scope_that_imports_it(tmp_path):
    root = tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "_X = 1\n",
            "pkg/b.py": "def uses():\n    import pkg.a as a\n    return a._X\n\n"
            "def other(obj):\n    a = obj\n    return a._private_member\n",
        },
    )
    (violation,) = private_attributes(scan(root, ("pkg",)))
    assert "b.py:3" in str(violation) and "pkg.a._X" in str(violation)
