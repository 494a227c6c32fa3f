"""The suite's own shape: the fast tier's time budget (tests/conftest.py) fails an unmarked test
that overruns it, and the markers a user selects by are on the tests that need what they name."""

import ast
import re
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent


def test_an_unmarked_test_over_the_fast_budget_fails_naming_its_time(pytester, monkeypatch):
    shutil.copy(TESTS / "conftest.py", pytester.path / "conftest.py")
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    pytester.makepyfile(test_budget="""
        import time
        import pytest

        def test_quick():
            pass

        def test_overruns():
            time.sleep(0.6)

        @pytest.mark.slow
        def test_overruns_but_is_marked_slow():
            time.sleep(0.6)

        def test_fails_on_its_own():
            time.sleep(0.6)
            assert False, "its own failure"

        @pytest.fixture(scope="session")
        def built_once():
            time.sleep(0.6)  # the suite's cost: not counted to the first test that needs it

        @pytest.fixture
        def built_for_the_test():
            time.sleep(0.6)  # the test's own set-up: counted

        def test_needs_a_session_fixture(built_once):
            pass

        def test_overruns_in_its_own_fixture(built_for_the_test):
            pass
    """)
    monkeypatch.setenv("FASTRLHF_FAST_BUDGET_S", "0.3")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=3, failed=3)
    out = result.stdout.str()
    assert re.search(r"test_overruns is not marked slow but took \d+\.\d s .*over the fast tier's 0\.3 s budget", out)
    assert re.search(r"test_overruns_in_its_own_fixture is not marked slow but took \d+\.\d s", out)
    assert "test_needs_a_session_fixture is not marked slow" not in out
    assert "its own failure" in out  # a test's own failure is reported as it is, not as the budget's
    monkeypatch.setenv("FASTRLHF_FAST_BUDGET_S", "0")  # off
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist").assert_outcomes(passed=5, failed=1)


# what each marker says a test needs, as its source shows it
NEEDS = {
    "vllm": re.compile(r'importorskip\("vllm"\)|"--engine", "vllm"|VLLMEngine\(|engine="vllm"'),
    "distributed": re.compile(r"torch\.distributed\.run|nproc=2|_run_script\("),
}


def _marks(decorators) -> set[str]:
    names = set()
    for d in decorators:
        node = d.func if isinstance(d, ast.Call) else d
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
            names.add(node.attr)
    return names


@pytest.mark.parametrize("marker", sorted(NEEDS))
def test_tests_that_need_an_engine_or_processes_carry_its_marker(marker):
    unmarked = []
    for path in sorted(TESTS.rglob("test_*.py")):
        if path.name == "test_suite_shape.py":
            continue
        source = path.read_text()
        tree = ast.parse(source)
        module_marks = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
                module_marks |= _marks(values)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if NEEDS[marker].search(ast.get_source_segment(source, node)) and \
                        marker not in module_marks | _marks(node.decorator_list):
                    unmarked.append(f"{path.relative_to(TESTS.parent)}::{node.name}")
    assert not unmarked, f"need @pytest.mark.{marker}: {unmarked}"
