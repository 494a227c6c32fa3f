"""The real pretrained model under torchrun: SmolLM2 (see test_smollm2.py) on two ranks.

Its own file so that the suite's two workers run it beside test_smollm2.py's in-process tests rather
than after them (both start first; its processes, one then three, hold about 8 GB at most, the other
worker's SmolLM2 run about 5 GB, on the 23 GB reference machine)."""

import pytest

from tests.trainer.test_distributed import _run
from tests.trainer.test_smollm2 import _grpo_args, _rows

pytestmark = pytest.mark.real_model


@pytest.mark.vllm
@pytest.mark.distributed
@pytest.mark.slow
def test_grpo_under_torchrun_trains_the_one_process_batch(smollm2, tmp_path):
    """Two ranks (FSDP2, a vLLM engine each, gloo): the same global batch as one process, so the
    same rewards, losses and gradient norms (to the float32 reduction order), and the sampler
    agrees with each rank's trainer after every push."""
    args = ["--engine", "vllm", "--prompts_per_step", "4", "--group_size", "2", "--steps", "2", "--eval_every", "2",
            "--device", "cpu"]
    runs = {}
    for n in (1, 2):  # the one process a subprocess too: its memory leaves with it
        out = tmp_path / f"n{n}"
        proc = _run(["grpo", *_grpo_args(smollm2, tmp_path, out, *args, heldout=2, max_new=8)], nproc=n, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = _rows(out)
    for a, b in zip(runs[1], runs[2]):
        for key in ("reward/mean", "loss/policy", "grad_norm", "eval/reward", "eval/sample_reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert all(0 < r["rollout/logprob_diff_max"] <= 1e-3 for r in runs[2][1:])
