"""fastrlhf demo: the whole RLHF pipeline on the built-in arithmetic task, on one machine.

    fastrlhf demo [--output-dir runs/demo] [--fast] [--engine auto|vllm|hf]

Stages, in order (each its own trainer, each writing DIR/<stage>/metrics.jsonl and final/):
  1. sft   supervised fine-tuning on imperfect demonstrations (15% wrong)
  2. rm    a reward model on the simulated annotator's comparisons (10% label noise): the
           log-prob head, beta * log p(response | prompt) under a copy of the SFT model tuned
           with the Bradley-Terry loss (reward_model_start_accuracy: before that tuning)
  3. ppo   PPO from the SFT model against that reward model, KL penalty to the SFT model,
           generation by colocated vLLM (when installed); the output layer learns at its own
           rate (head_lr 1e-3, 20x the body's), as in grpo: RL's gain on this task is sharpening
  4. dpo   DPO (cDPO) from the SFT model on the same comparisons, for contrast
  5. grpo  GRPO from the SFT model with the task's exact-match checker as the reward (a
           verifier instead of a learned reward model), for contrast
Then every policy is evaluated with one protocol: the task's held-out prompts, transformers
generate (at most 5 new tokens), exact match, as the share of 4 samples per prompt at
temperature 1 that are right (<stage>_accuracy: the policy as it behaves when sampled, where
the demonstrators' copied mistakes show) and greedy (<stage>_greedy_accuracy: the policy's
mode, which hides them). DIR/summary.json holds the accuracies, the reward model's held-out
pairwise accuracy and the seconds per stage; DIR/report.png draws reward, KL and held-out
accuracy over the PPO steps (and GRPO's beside PPO's) and every stage's accuracy side by side.

Each stage runs with its example config, examples/<stage>.yaml (the very file
`fastrlhf <stage> --config examples/<stage>.yaml` reads), plus the paths between the stages.
`--fast` shrinks everything to the tiny model and a few steps per stage: a smoke run.

    fastrlhf demo --model smollm2 [--output-dir runs/demo-smollm2] [--fast]

The real-model demo (any chat model: a known name, a GGUF file, an HF directory): RLHF on a task
the model partly solves, chat sums (fastrlhf.tasks.chat_sums: "What is 7 + 5?" and word problems,
the reward 1 where the reply's last number is the answer), all through the files and flags a user
passes:
  1. grpo  GRPO from the model with the verifier as the reward (examples/chat-grpo.yaml)
  2. pairs the model's own replies to the training prompts (PAIR_SAMPLES each, vLLM), a simulated
           annotator (the verifier) choosing between a reply it accepts and one it rejects
  3. dpo   DPO from the model on those comparisons (examples/chat-dpo.yaml): the feedback loop
Then the model, the GRPO policy and the DPO policy are evaluated with one protocol, the online
trainers' own (online.evaluate, one vLLM engine given each policy's weights): CHAT_EVAL_PROMPTS
held-out prompts, reward of the greedy reply and of EVAL_SAMPLES sampled at temperature 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastrlhf import cli, files
from fastrlhf.tasks import arithmetic as ar

STAGES = ("sft", "rm", "ppo", "dpo", "grpo")


def example_config(stage: str) -> Path:
    """examples/<stage>.yaml: the settings the stage runs with (installed as fastrlhf.examples)."""
    import importlib.resources

    path = importlib.resources.files("fastrlhf.examples") / f"{stage}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"the example config {path} is missing: reinstall fastrlhf")
    return Path(str(path))


# --fast: overrides on top of the examples (a smoke run on the tiny model)
FAST = {
    "sft": {"task_model_size": "tiny", "task_examples": 300, "epochs": 1, "tokens_per_step": 128,
            "warmup_steps": 2, "eval_every": 1000, "task_eval_prompts": 16},
    "rm": {"task_pairs": 128, "task_eval_pairs": 32, "pairs_per_step": 32, "epochs": 1, "warmup_steps": 1},
    "ppo": {"prompts_per_step": 8, "steps": 2, "critic_warmup": 1, "eval_every": 1, "task_prompts": 64,
            "task_eval_prompts": 16,
            "enforce_eager": True, "gpu_memory_utilization": 0.05},
    "dpo": {"task_pairs": 64, "task_eval_pairs": 16, "pairs_per_step": 16, "epochs": 1, "warmup_steps": 1,
            "task_eval_prompts": 16},
    "grpo": {"prompts_per_step": 4, "group_size": 4, "steps": 2, "eval_every": 1, "task_prompts": 64,
             "task_eval_prompts": 16, "enforce_eager": True, "gpu_memory_utilization": 0.05},
}

EVAL_PROMPTS = 200  # held-out prompts for the final comparison (FAST: 16)

# the real-model demo (--model): prompts, samples per prompt for the comparisons, held-out prompts
CHAT_TRAIN_PROMPTS, PAIR_PROMPTS, PAIR_SAMPLES, CHAT_EVAL_PROMPTS = 400, 400, 8, 64
CHAT_STAGES = ("chat-grpo", "chat-dpo")  # examples/<stage>.yaml
CHAT_FAST = {"chat-grpo": {"steps": 1, "eval_every": 1, "prompts_per_step": 4, "group_size": 4,
                           "max_new_tokens": 16, "enforce_eager": True, "gpu_memory_utilization": 0.05},
             "chat-dpo": {"epochs": 1, "pairs_per_step": 4, "max_steps": 2}}


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def run_stage(name: str, argv: list[str], times: dict, fast: bool) -> dict:
    """One stage as `fastrlhf <trainer> --config examples/<name>.yaml ARGV` runs it (name: the
    trainer, or chat-<trainer> for the real-model demo's)."""
    print(f"== {name}", file=sys.stderr, flush=True)
    t0 = time.time()
    fast_flags = _flags({**FAST, **CHAT_FAST}[name]) if fast else []
    summary = cli.train(name.removeprefix("chat-"), ["--config", str(example_config(name))] + fast_flags + argv)
    times[f"{name}_seconds"] = round(time.time() - t0, 1)
    print(f"{name}: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float)),
          file=sys.stderr, flush=True)
    return summary


def evaluate_policies(dirs: dict[str, Path], n_prompts: int) -> dict[str, float]:
    """The one protocol for every policy, on the same held-out prompts: <name>_accuracy is the
    exact-match rate of ar.EVAL_SAMPLES samples per prompt at temperature 1 (the policy as it
    behaves when sampled, where imitated mistakes show); <name>_greedy_accuracy is greedy."""
    from fastrlhf import models

    heldout = ar.heldout_prompts(ar.ArithmeticTask(), n_prompts)
    out = {}
    for name, d in dirs.items():
        model, tok = models.load_causal_lm(d), models.load_tokenizer(d)
        out[f"{name}_accuracy"] = ar.sampled_accuracy(model, tok, heldout)
        out[f"{name}_greedy_accuracy"] = ar.accuracy(model, tok, heldout)
    return out


def draw_report(out: Path, summary: dict) -> Path:
    """reward, KL and held-out accuracy over the PPO steps; every stage's accuracy side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/sample_accuracy" in r]
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    ax[0].plot([r["step"] for r in steps], [r["reward/mean"] for r in steps])
    ax[0].set(title="PPO: reward-model score of samples", xlabel="step")
    ax[1].plot([r["step"] for r in steps], [r["kl"] for r in steps], color="C1")
    ax[1].set(title="PPO: KL to the SFT model (per sample)", xlabel="step")
    ax[2].plot([r["step"] for r in evals], [r["eval/sample_accuracy"] for r in evals], marker="o",
               label="PPO (reward model)")
    g = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    g = [r for r in g if "eval/sample_accuracy" in r]
    ax[2].plot([r["step"] for r in g], [r["eval/sample_accuracy"] for r in g], marker="o", color="C2",
               label="GRPO (verifier)")
    ax[2].axhline(summary["sft_accuracy"], ls="--", color="gray", label="SFT")
    ax[2].set(title="held-out accuracy (sampled, T=1) over RL steps", xlabel="step", ylim=(0, 1))
    ax[2].legend()
    names = ["sft", "rlhf", "dpo", "grpo"]
    vals = [summary[f"{n}_accuracy"] for n in names] + [summary["reward_model_accuracy"]]
    bars = ax[3].bar(["SFT", "PPO\n(vs RM)", "DPO", "GRPO\n(verifier)", "RM\npairwise"], vals,
                     color=["gray", "C0", "C3", "C2", "C4"])
    ax[3].bar_label(bars, fmt="%.2f")
    ax[3].set(title="held-out accuracy by stage (sampled, T=1)", ylim=(0, 1))
    fig.tight_layout()
    path = out / "report.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _chat_engine(model_dir: str, policy, tok, max_len: int, fast: bool):
    from fastrlhf.rollout import make_engine

    return make_engine("auto", model_dir=model_dir, policy=policy, tokenizer=tok, max_model_len=max_len, seed=0,
                       gpu_memory_utilization=0.05, enforce_eager=fast)


def chat_pairs(model_dir: str, prompts: list[dict], out: Path, max_new_tokens: int, fast: bool) -> dict:
    """The model's own replies, PAIR_SAMPLES per training prompt, and the simulated annotator's
    choice between two of them (chat_sums.label_pairs: the first it accepts against the first it
    rejects); prompts where all replies are right or all wrong give no comparison. Writes
    out/pairs.jsonl (the replies, as `fastrlhf pairs` does) and out/prefs.jsonl (the comparisons)."""
    import torch

    from fastrlhf import data, models
    from fastrlhf.rollout import Colocated
    from fastrlhf.tasks import chat_sums

    tok = models.load_tokenizer(model_dir)
    policy = models.load_frozen(model_dir, device="cpu", dtype=torch.float32)
    ids = [data.prompt_ids(tok, r["prompt"]) for r in prompts]
    engine = _chat_engine(model_dir, policy, tok, max(map(len, ids)) + max_new_tokens, fast)
    with Colocated(engine, policy) as colocated, colocated.generating() as gen:
        groups = gen.generate(ids, n=PAIR_SAMPLES, temperature=1.0, max_tokens=max_new_tokens, seed=1)
    rows = []
    for rec, group in zip(prompts, groups):
        texts = [tok.decode(s.completion_ids, skip_special_tokens=True) for s in group]
        right = [t for t in texts if chat_sums.last_number(t) == rec["answer"]]
        wrong = [t for t in texts if chat_sums.last_number(t) != rec["answer"]]
        a, b = (right[0], wrong[0]) if right and wrong else (texts[0], texts[1])
        rows.append({"prompt": json.dumps(rec["prompt"]), "a": a, "b": b, "answer": rec["answer"]})
    prefs, dropped = chat_sums.label_pairs(rows)
    ar.write_jsonl(rows, out / "pairs.jsonl")
    ar.write_jsonl(prefs, out / "prefs.jsonl")
    return {"pairs_labelled": len(prefs), "pairs_without_preference": dropped}


def evaluate_chat_policies(dirs: dict[str, str], heldout: list[dict], max_new_tokens: int, fast: bool) -> dict:
    """Every policy through the online trainers' own evaluation (online.evaluate) on the same
    held-out prompts: <name>_reward (greedy reply) and <name>_sample_reward (EVAL_SAMPLES replies
    at temperature 1 each). One vLLM engine serves them all, given each policy's weights in turn."""
    import torch

    from fastrlhf import data, models
    from fastrlhf.algos import online
    from fastrlhf.rollout import Colocated

    first = next(iter(dirs.values()))
    tok = models.load_tokenizer(first)
    prompts = [online.Prompt(r, data.prompt_ids(tok, r["prompt"])) for r in heldout]
    scorer = online.make_scorer(online.RewardFunction("fastrlhf.tasks.chat_sums:reward"), None, tok, 4096, "cpu")
    engine, out = None, {}
    for name, d in dirs.items():
        policy = models.load_frozen(d, device="cpu", dtype=torch.float32)
        if engine is None or engine.name == "hf":  # the HF engine generates with the policy it was given
            engine = _chat_engine(first, policy, tok, max(len(p.ids) for p in prompts) + max_new_tokens, fast)
        res = online.evaluate(Colocated(engine, policy), prompts, tok, max_new_tokens, scorer)
        out[f"{name}_reward"], out[f"{name}_sample_reward"] = res["eval/reward"], res["eval/sample_reward"]
        print(f"{name}: greedy reward {res['eval/reward']:.3f}, sampled {res['eval/sample_reward']:.3f}",
              file=sys.stderr, flush=True)
    engine.close()
    return out


def chat_demo(args) -> dict:
    """The real-model demo (see the module docstring): data, GRPO, the model's own comparisons,
    DPO, one evaluation of the three. DIR/summary.json holds the rewards and the seconds per stage."""
    from fastrlhf import hub
    from fastrlhf.tasks import chat_sums

    out = Path(args.output_dir)
    model = hub.resolve(args.model)  # a name or GGUF: converted once, before any stage
    fast = args.fast
    n_eval = 8 if fast else CHAT_EVAL_PROMPTS
    train_prompts = chat_sums.prompts(64 if fast else CHAT_TRAIN_PROMPTS, "train")
    train_path = ar.write_jsonl(train_prompts, out / "data" / "train.jsonl")
    heldout = chat_sums.prompts(n_eval, "test")
    heldout_path = ar.write_jsonl(heldout, out / "data" / "heldout.jsonl")
    common = ["--device", args.device]
    times: dict = {}
    run_stage("chat-grpo", common + ["--model", model, "--data", str(train_path), "--eval_data", str(heldout_path),
                                     "--output_dir", str(out / "grpo")], times, fast)
    max_new = 16 if fast else 32
    print("== pairs (the model's own replies, labelled by the simulated annotator)", file=sys.stderr, flush=True)
    t0 = time.time()
    pairs = chat_pairs(model, chat_sums.prompts(16 if fast else PAIR_PROMPTS, "train"), out / "data", max_new, fast)
    times["pairs_seconds"] = round(time.time() - t0, 1)
    run_stage("chat-dpo", common + ["--model", model, "--data", str(out / "data" / "prefs.jsonl"),
                                    "--output_dir", str(out / "dpo")], times, fast)
    print("== evaluation (held-out prompts, the verifier's reward, greedy and sampled)", file=sys.stderr, flush=True)
    t0 = time.time()
    summary = evaluate_chat_policies({"base": model, "grpo": str(out / "grpo" / "final"),
                                      "dpo": str(out / "dpo" / "final")}, heldout, max_new, fast)
    times["evaluation_seconds"] = round(time.time() - t0, 1)
    summary.update({**pairs, **times, "total_seconds": round(sum(times.values()), 1), "fast": fast, "model": args.model,
                    "eval_protocol": f"{n_eval} held-out chat-sum prompts, reward 1 where the reply's last number is "
                                     f"the answer, at most {max_new} new tokens; *_reward: the greedy reply, "
                                     f"*_sample_reward: {ar.EVAL_SAMPLES} replies at temperature 1"})
    files.write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.endswith("reward") and isinstance(v, float))
          + f"  ({summary['total_seconds']:.0f} s) -> {out / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="fastrlhf demo", description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--fast", action="store_true", help="tiny model, a few steps per stage (a smoke run)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"], help="PPO's rollout engine")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="", help="the real-model demo on this chat model (a name such as smollm2, a "
                                                "GGUF file, an HF directory): GRPO and DPO on chat sums")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.model:
        if args.output_dir == "runs/demo":
            args.output_dir = f"runs/demo-{Path(args.model).stem.lower()}"
        return chat_demo(args)
    out = Path(args.output_dir)
    import importlib.util

    can_plot = importlib.util.find_spec("matplotlib") is not None
    if not can_plot:  # said before 10 minutes of training, not as a crash after them
        print("fastrlhf demo: matplotlib is not installed: the stages run and summary.json is written, but no "
              "report.png (pip install matplotlib)", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--device", args.device]
    times: dict = {}

    sft_sum = run_stage("sft", common + ["--output_dir", str(out / "sft")], times, args.fast)
    sft_dir = out / "sft" / "final"
    rm_sum = run_stage("rm", common + ["--model", str(sft_dir), "--output_dir", str(out / "rm")], times, args.fast)
    run_stage("ppo", common + ["--model", str(sft_dir), "--reward_model", str(out / "rm" / "final"),
                               "--engine", args.engine, "--output_dir", str(out / "ppo")], times, args.fast)
    run_stage("dpo", common + ["--model", str(sft_dir), "--output_dir", str(out / "dpo")], times, args.fast)
    run_stage("grpo", common + ["--model", str(sft_dir), "--engine", args.engine, "--output_dir", str(out / "grpo")],
              times, args.fast)

    print("== evaluation (held-out prompts, exact match, sampled and greedy)", file=sys.stderr, flush=True)
    summary = evaluate_policies({"sft": sft_dir, "rlhf": out / "ppo" / "final", "dpo": out / "dpo" / "final",
                                 "grpo": out / "grpo" / "final"}, 16 if args.fast else EVAL_PROMPTS)
    summary.update({"reward_model_accuracy": rm_sum["eval/accuracy"],
                    "reward_model_start_accuracy": rm_sum.get("start/accuracy"),
                    "sft_eval_loss": sft_sum.get("eval/loss"), **times,
                    "total_seconds": round(sum(times.values()), 1), "fast": args.fast,
                    "eval_protocol": f"{16 if args.fast else EVAL_PROMPTS} held-out prompts, exact match, "
                                     f"at most 5 new tokens; *_accuracy: {ar.EVAL_SAMPLES} samples per prompt "
                                     "at temperature 1; *_greedy_accuracy: greedy"})
    files.write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if can_plot:
        draw_report(out, summary)
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items()
                   if k.endswith("accuracy") and "greedy" not in k and isinstance(v, float)) +
          f"  -> {out / 'summary.json'}, {out / 'report.png'}")
    return summary


if __name__ == "__main__":
    main()
