"""fastrlhf demo: a reduced run covers every stage and writes the summary and the report;
the demo's stage settings are the examples' (so the README's numbers describe both)."""

import json
from pathlib import Path

import pytest
import yaml

from fastrlhf import cli, demo

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("stage", list(demo.STAGES))
def test_demo_stages_use_the_example_settings(stage):
    example = yaml.safe_load((EXAMPLES / f"{stage}.yaml").read_text())
    example.pop("output_dir")
    assert demo.STAGES[stage] == example


@pytest.mark.slow
def test_demo_fast_runs_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")  # the kernels run interpreted elsewhere
    out = tmp_path / "demo"
    assert cli.main(["demo", "--fast", "--output-dir", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("sft_accuracy", "rlhf_accuracy", "dpo_accuracy", "grpo_accuracy", "reward_model_accuracy",
                "sft_seconds", "rm_seconds", "ppo_seconds", "dpo_seconds", "grpo_seconds", "eval_protocol"):
        assert key in summary, key
    for stage in ("sft", "rlhf", "dpo", "grpo"):  # sampled (4 per prompt: multiples of 1/64) and greedy (1/16)
        assert (summary[f"{stage}_accuracy"] * 64) % 1 == pytest.approx(0, abs=1e-9), stage
        assert (summary[f"{stage}_greedy_accuracy"] * 16) % 1 == pytest.approx(0, abs=1e-9), stage
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        assert (out / stage / "final" / "config.json").exists(), stage
        assert summary[f"{stage}_seconds"] > 0
    assert 0.0 <= summary["reward_model_accuracy"] <= 1.0
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval/sample_accuracy" in r] == [0, 1, 2]
    assert (out / "report.png").stat().st_size > 10_000
