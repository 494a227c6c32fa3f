"""fastrlhf demo: its stages run from the example configs (so the README's numbers describe
both), and a reduced run covers every stage and writes the summary and the report."""

import importlib
import json
from pathlib import Path

import pytest
import yaml

from fastrlhf import cli, config, demo

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_demo_stages_run_from_the_example_files(tmp_path, monkeypatch):
    """Each stage is `fastrlhf <stage> --config examples/<stage>.yaml` plus the paths between the
    stages (no copy of the settings to keep in step): the config each stage gets is the example's."""
    seen = {}

    def record(command, argv):
        cfg = config.load_config(getattr(importlib.import_module(cli.COMMANDS[command][0]), cli.TRAINERS[command]),
                                 argv)
        seen[command] = (argv, cfg)
        raise SystemExit(0)  # stop after the first stage's config

    monkeypatch.setattr(cli, "train", record)
    with pytest.raises(SystemExit):
        demo.main(["--output-dir", str(tmp_path)])
    argv, cfg = seen["sft"]
    assert argv[:2] == ["--config", str(EXAMPLES / "sft.yaml")]
    example = yaml.safe_load((EXAMPLES / "sft.yaml").read_text())
    for key, value in example.items():
        assert getattr(cfg, key) == (str(tmp_path / "sft") if key == "output_dir" else value), key
    for stage in demo.STAGES:
        assert demo.example_config(stage) == EXAMPLES / f"{stage}.yaml"


@pytest.mark.slow
@pytest.mark.vllm
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


def test_the_real_model_demo_runs_its_stages_from_the_example_files(tmp_path, monkeypatch):
    """`fastrlhf demo --model M`: GRPO then DPO, each `fastrlhf <trainer> --config
    examples/chat-<trainer>.yaml` with the demo's data files and M; the chat-sum prompts it writes
    are disjoint from the held-out ones."""
    seen = {}

    def record(command, argv):
        cfg = config.load_config(getattr(importlib.import_module(cli.COMMANDS[command][0]), cli.TRAINERS[command]),
                                 argv)
        seen[command] = (argv, cfg)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "train", record)
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(SystemExit):
        demo.main(["--model", str(model), "--output-dir", str(tmp_path / "d")])
    argv, cfg = seen["grpo"]
    assert argv[:2] == ["--config", str(EXAMPLES / "chat-grpo.yaml")]
    example = yaml.safe_load((EXAMPLES / "chat-grpo.yaml").read_text())
    for key, value in example.items():
        assert getattr(cfg, key) == (str(tmp_path / "d" / "grpo") if key == "output_dir" else value), key
    assert cfg.model == str(model) and cfg.reward_fn == "fastrlhf.tasks.chat_sums:reward"

    def rows(name):
        return [json.loads(x)["prompt"][0]["content"] for x in Path(getattr(cfg, name)).read_text().splitlines()]

    train, held = rows("data"), rows("eval_data")
    assert len(train) == demo.CHAT_TRAIN_PROMPTS and len(held) == demo.CHAT_EVAL_PROMPTS and not set(train) & set(held)
    for stage in demo.CHAT_STAGES:
        assert demo.example_config(stage) == EXAMPLES / f"{stage}.yaml"
