"""What a new user brings besides a model: chat data in TRL's formats, their own reward
function, a GPU checkpoint on a CPU machine, bf16 training, and the first `--help`.

Chat data is tokenised through the tokenizer's own chat template (a real BPE with ChatML,
tests/archs.py) and the token masks are checked exactly; reward functions are called the way
TRL calls them; bf16 compute keeps float32 master weights (an RL-sized learning rate moves the
weights as float32 training does); failures are one line, exit status 2.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf import checkpoints, cli, data, models, optim
from fastrlhf.algos import grpo, online, sft
from fastrlhf.rollout import Sample
from fastrlhf.tasks import arithmetic as ar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import archs  # noqa: E402

TOY = ["--max_len", "64", "--tokens_per_micro_batch", "4096"]


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")  # the interpreter runs the kernels elsewhere


@pytest.fixture(scope="module")
def tok():
    return archs.build_tokenizer()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return archs.save_arch("qwen2", tmp_path_factory.mktemp("qwen") / "qwen2")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- chat templates and masks


def test_multi_turn_chat_masks_are_exactly_the_assistant_turns(tok):
    """Every assistant turn is trained on, up to and including its <|im_end|> (what generation
    stops at); system, user, the assistant headers and the newline after <|im_end|> are not."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"}]
    ids, labels = data.conversation(tok, msgs)
    assert ids == data.chat_ids(tok, msgs)  # the template's own rendering, token for token
    start, end, nl = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")), None, _ids(tok, "\n")
    start, end = list(start)[0], tok.convert_tokens_to_ids("<|im_end|>")

    def turn(role, content):
        return [start] + _ids(tok, f"{role}\n") + _ids(tok, content) + [end] + nl

    by_hand = turn("system", "Be brief.") + turn("user", "What is 2+2?") + turn("assistant", "4") + \
        turn("user", "And 3+3?") + turn("assistant", "6")
    assert ids == by_hand
    trained = [y for y in labels if y != data.IGNORE]
    assert trained == _ids(tok, "4") + [end] + _ids(tok, "6") + [end]
    # the label sits at the token itself (pack shifts them): the header before each answer is masked
    first = ids.index(end, len(turn("system", "Be brief.") + turn("user", "What is 2+2?")))
    assert labels[first] == end and labels[first + 1] == data.IGNORE  # "\n" after <|im_end|>


def test_prompt_completion_train_only_the_completion(tok):
    prompt = [{"role": "user", "content": "What is 7+8?"}]
    for completion in ("15", [{"role": "assistant", "content": "15"}]):
        ids, labels = data.tokenize_pair(tok, prompt, completion, 128, data.Truncations())
        p = data.prompt_ids(tok, prompt)
        assert ids[: len(p)] == p and all(y == data.IGNORE for y in labels[: len(p)])
        assert [y for y in labels if y != data.IGNORE] == _ids(tok, "15") + [tok.eos_token_id]


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    """A template that renders history differently from the turn itself (as reasoning templates
    that drop earlier <think> blocks do) cannot give per-turn masks: one clear error."""
    import copy

    bad = copy.copy(tok)
    bad.chat_template = ("{% for m in messages %}{% if loop.last %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                         "{% else %}{{ m['role'] + '> ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(data.DataError, match="not a continuation"):
        data.conversation(bad, msgs)


def test_chat_data_without_a_chat_template_is_a_clear_error():
    tok = ar.build_tokenizer()
    with pytest.raises(data.DataError, match="no chat_template"):
        data.prompt_ids(tok, [{"role": "user", "content": "1+1="}])


# ---------------------------------------------------------------- TRL's formats and files


def test_sft_formats_as_trl_reads_them(tmp_path):
    rows = [{"prompt": "Q: 1+1?", "completion": " 2"},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"text": "plain language modelling"},
            {"prompt": "ours", "response": "too"}]
    got = data.load_sft(_jsonl(tmp_path / "s.jsonl", rows))
    assert got[0] == {"prompt": "Q: 1+1?", "response": " 2"}
    assert got[1] == got[2] == {"prompt": [{"role": "user", "content": "hi"}],
                                "response": [{"role": "assistant", "content": "yo"}]}
    assert got[3]["prompt"] == [] and got[4] == {"prompt": "", "response": "plain language modelling"}
    with pytest.raises(data.DataError,
                       match=r"s2.jsonl:1: 'completion' is a list of messages but 'prompt' is a string"):
        data.load_sft(_jsonl(tmp_path / "s2.jsonl", [{"prompt": "q", "completion": [{"role": "assistant",
                                                                                     "content": "a"}]}]))
    with pytest.raises(data.DataError, match=r"s3.jsonl:1: 'messages' has no assistant turn"):
        data.load_sft(_jsonl(tmp_path / "s3.jsonl", [{"messages": [{"role": "user", "content": "a"}]}]))


def test_preference_formats_as_trl_reads_them(tmp_path):
    conv = lambda role, c: [{"role": role, "content": c}]  # noqa: E731
    rows = [{"prompt": "Q?", "chosen": "good", "rejected": "bad"},
            {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"},  # implicit prompt
            {"prompt": conv("user", "Q?"), "chosen": conv("assistant", "good"), "rejected": conv("assistant", "bad")},
            {"chosen": conv("user", "Q?") + conv("assistant", "good"),
             "rejected": conv("user", "Q?") + conv("assistant", "bad")}]
    got = data.load_preferences(_jsonl(tmp_path / "p.jsonl", rows))
    assert got[0] == {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
    assert got[1] == {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}  # TRL's extract_prompt
    assert got[2] == got[3] == {"prompt": conv("user", "Q?"), "chosen": conv("assistant", "good"),
                                "rejected": conv("assistant", "bad")}
    with pytest.raises(data.DataError, match="share no common start"):
        data.load_preferences(_jsonl(tmp_path / "q.jsonl", [{"chosen": "a", "rejected": "b"}]))


def test_parquet_json_and_datasets_directories_load(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "splits"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    want = [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2=", "response": "4"}]
    for path in ("d.parquet", "single", "splits", "d.json"):
        assert data.load_sft(tmp_path / path) == want, path
    assert data.load_sft(f"{tmp_path / 'splits'}:test") == want[1:]
    with pytest.raises(data.DataError, match=r"no split 'dev' \(has \['test', 'train'\]\)"):
        data.load_sft(f"{tmp_path / 'splits'}:dev")
    bad = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": 2}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(data.DataError, match=r"bad:row 0: field 'completion' must be a string"):
        data.load_sft(tmp_path / "bad")


def test_dpo_and_rm_train_on_conversational_pairs(qwen, tmp_path):
    conv = lambda role, c: [{"role": role, "content": c}]  # noqa: E731
    rows = [{"prompt": conv("user", f"What is {i}+{i}?"), "chosen": conv("assistant", str(2 * i)),
             "rejected": conv("assistant", str(2 * i + 1))} for i in range(12)]
    prefs = _jsonl(tmp_path / "prefs.jsonl", rows)
    common = ["--model", str(qwen), "--data", str(prefs), "--eval_data", str(prefs), "--max_steps", "2",
              "--pairs_per_step", "6", "--max_len", "64", "--device", "cpu", "--eval_every", "2"]

    d = cli.train("dpo", common + ["--output_dir", str(tmp_path / "dpo"), "--lr", "1e-3"])
    r = cli.train("rm", common + ["--output_dir", str(tmp_path / "rm"), "--lr", "1e-3"])
    assert 0.0 <= d["eval/reward_accuracy"] <= 1.0 and 0.0 <= r["eval/accuracy"] <= 1.0
    shown = [json.loads(x) for x in (tmp_path / "dpo" / "samples.jsonl").read_text().splitlines()]
    assert shown and shown[0]["prompt"] == rows[0]["prompt"] and "chosen" in shown[0]


# ---------------------------------------------------------------- reward functions


def _samples(tok, prompt_ids, texts, index=0):
    return [Sample(index, list(prompt_ids), _ids(tok, t) + [tok.eos_token_id], [0.0], "stop") for t in texts]


def trl_style(prompts, completions, completion_ids, answer, **kwargs):
    """A TRL reward function: batched, keyword arguments, the dataset's fields as lists."""
    trl_style.calls.append({"prompts": prompts, "completions": completions, "answer": answer,
                            "n_ids": [len(c) for c in completion_ids], "extra": sorted(kwargs)})
    return [1.0 if c[0]["content"] == a else None if c[0]["content"] == "?" else 0.0
            for c, a in zip(completions, answer)]


trl_style.calls = []


def test_trl_batched_reward_functions_get_trl_arguments(tok):
    fn = online.RewardFunction("tests.trainer.test_user_data:trl_style")
    assert fn.batched
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    prompts = [online.Prompt({"prompt": prompt, "answer": "4", "level": 1}, data.prompt_ids(tok, prompt))]
    samples = _samples(tok, prompts[0].ids, ["4", "5", "?"])
    counters = {}
    fn(samples, prompts, tok, counters)
    call = trl_style.calls[-1]
    assert call["prompts"] == [prompt] * 3 and call["answer"] == ["4"] * 3 and call["extra"] == ["level"]
    assert call["completions"][0] == [{"role": "assistant", "content": "4"}]  # conversational, as TRL
    assert [s.reward for s in samples[:2]] == [1.0, 0.0]
    assert "returned None" in samples[2].info["failed"] and counters == {"reward_failures": 1}


def test_reward_module_in_the_working_directory_and_a_file_path(tok, tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text("def score(prompt, response, **_):\n    return float(len(response))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    for spec in ("myreward:score", str(tmp_path / "myreward.py") + ":score"):
        fn = online.RewardFunction(spec)
        samples = _samples(tok, [1], ["abc"])
        fn(samples, [online.Prompt({"prompt": "x"}, [1])], tok, {})
        assert samples[0].reward == 3.0, spec


def broken(prompt, response, **_):
    raise KeyError("judge")


def test_the_first_failure_is_shown_once_and_an_all_failed_step_stops(tok, capsys):
    fn = online.RewardFunction("tests.trainer.test_user_data:broken")
    prompts = [online.Prompt({"prompt": "x"}, [1])]
    with pytest.raises(online.RewardError, match="every sample of the step failed; the first: KeyError: 'judge'"):
        fn(_samples(tok, [1], ["a", "b"]), prompts, tok, {})
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "raise KeyError" in err
    with pytest.raises(online.RewardError):
        fn(_samples(tok, [1], ["a"]), prompts, tok, {})
    assert "Traceback" not in capsys.readouterr().err  # once per run


def test_cli_reward_errors_are_one_line(qwen, tmp_path, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"Hello {i}"} for i in range(4)])
    base = ["grpo", "--model", str(qwen), "--data", str(prompts), "--engine", "hf", "--device", "cpu",
            "--output_dir", str(tmp_path / "g"), "--max_len", "64", "--max_new_tokens", "4",
            "--prompts_per_step", "2", "--group_size", "2", "--steps", "1"]
    assert cli.main(base) == 2  # your prompts, no reward: not the arithmetic checker's silent zeros
    assert "needs a reward: --reward_fn" in capsys.readouterr().err
    assert cli.main(base + ["--reward_fn", "tests.trainer.test_user_data:broken"]) == 2
    assert "every sample of the step failed" in capsys.readouterr().err.splitlines()[-1]


# ---------------------------------------------------------------- precision


def _changed(before, model):
    moved = [(p.detach() != before[n]).float().mean().item() for n, p in model.named_parameters()]
    return sum(moved) / len(moved)


def test_bf16_compute_keeps_float32_master_weights(tmp_path, monkeypatch):
    """One SFT step at lr 1e-6, float32 vs bfloat16 compute: with float32 master weights both
    change nearly every weight (pure bf16 weights kept ~12% of the update: most RL-sized steps
    round away); the updates agree closely; final/ is saved in bfloat16."""
    base = ar.save_base_model(tmp_path / "base", **ar.MODEL_SIZES["tiny"])
    before = {n: p.detach().clone() for n, p in models.load_causal_lm(base).named_parameters()}
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        cli.train("sft", ["--model", str(base), "--output_dir", str(out), "--task_examples", "64",
                          "--tokens_per_step", "64",
                  "--max_steps", "1", "--lr", "1e-6", "--warmup_steps", "0", "--schedule", "constant",
                  "--eval_every", "1", "--log_samples", "0", "--device", "cpu", "--dtype", dtype, *TOY])
        cfg = json.loads((out / "final" / "config.json").read_text())
        assert cfg["dtype"] == dtype
        runs[dtype] = models.load_causal_lm(out / "final", dtype=torch.float32, verify=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bfloat16" / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # final/ in bf16 rounds the weights: compare the updates through the fp32 run's rounding
    fp32_moved = _changed(before, runs["float32"])
    assert fp32_moved > 0.7
    # the bf16 run's update, measured on its float32 masters (a checkpoint keeps them)
    masters = tmp_path / "bf16-masters"
    cli.train("sft", ["--model", str(base), "--output_dir", str(masters), "--task_examples", "64",
                      "--tokens_per_step", "64",
              "--max_steps", "2", "--save_every", "1", "--lr", "1e-6", "--warmup_steps", "0", "--schedule", "constant",
              "--eval_every", "5", "--log_samples", "0", "--device", "cpu", "--dtype", "bfloat16", *TOY])
    step1 = models.load_causal_lm(masters / "checkpoints" / "step-1", verify=False)
    assert next(step1.parameters()).dtype == torch.float32
    bf16_moved = _changed(before, step1)
    print(f"share of weights moved: float32 {fp32_moved:.3f}, bfloat16 compute {bf16_moved:.3f}")
    assert bf16_moved > 0.9 * fp32_moved, (bf16_moved, fp32_moved)
    d32 = torch.cat([(p.detach() - before[n]).flatten() for n, p in runs["float32"].named_parameters()])
    d16 = torch.cat([(p.detach() - before[n]).flatten() for n, p in step1.named_parameters()])
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9


def test_pure_bf16_weights_would_lose_the_update():
    """The measurement behind master weights: the same AdamW step at lr 1e-5 on bf16 weights."""
    model = ar.build_model(**ar.MODEL_SIZES["tiny"])
    for dtype, low, high in ((torch.float32, 0.7, 1.0), (torch.bfloat16, 0.0, 0.3)):
        m = ar.build_model(**ar.MODEL_SIZES["tiny"]).to(dtype)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        m(torch.randint(0, 16, (2, 12)), labels=torch.randint(0, 16, (2, 12))).loss.backward()
        opt.step()
        assert low <= _changed(before, m) <= high, dtype
    del model


def test_gradient_checkpointing_gives_the_same_gradients(qwen):
    seqs = [(s, s) for s in ([1, 5, 9, 33, 70, 2, 8], [4, 4, 100, 3])]
    mb = data.pack(seqs, 64)[0]
    grads = []
    for ckpt in (False, True):
        cfg = sft.SFTConfig(gradient_checkpointing=ckpt)
        model = models.load_trained(qwen, cfg, "cpu")
        model.train()
        models.token_logprobs(model, mb).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert model.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- resume, help, settings


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tmp_path, monkeypatch):
    """trainer_state.pt saved from CUDA tensors carries a cuda location tag; without map_location
    loading it on a CPU-only machine fails."""
    import torch.serialization as ser

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    sched = optim.make_schedule(opt, 0, 10, "constant")
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    with monkeypatch.context() as m:  # what torch.save writes for tensors on cuda:0
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "python_rng": __import__("random").getstate(),
                    "torch_rng": torch.get_rng_state(), "step": 1, "counters": {}}, ckpt / "trainer_state.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt / "trainer_state.pt", weights_only=False)
    state = checkpoints.load_trainer_state(ckpt, model, opt, sched)
    assert state["step"] == 1


def test_help_prints_every_field_with_its_help(capsys):
    for command in ("sft", "rm", "dpo", "grpo", "ppo"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--dtype" in text and "--gradient_checkpointing" in text and "'option_strings'" not in text
    with pytest.raises(SystemExit):
        cli.main(["sft", "--help"])
    assert "split 5% off" in capsys.readouterr().out  # the literal % that crashed argparse


@pytest.mark.parametrize("flag,message", [
    (["--eval_every", "0"], "eval_every=0: expected >= 1"),
    (["--dtype", "half"], "dtype='half': expected one of ['auto', 'bfloat16'"),
    (["--device", "tpu"], "device='tpu': expected auto, cpu or cuda[:N]"),
    (["--max_len", "4096"], "max_len=4096 is longer than the model's max_position_embeddings=1024"),
])
def test_settings_that_cannot_be_right_are_one_line(flag, message, tmp_path, capsys):
    code = cli.main(["sft", "--task_model_size", "tiny", "--task_examples", "16", "--output-dir",
                     str(tmp_path / "o"), *flag])
    assert code == 2
    assert message in capsys.readouterr().err


def test_ppo_with_a_reward_model_on_user_prompts_evaluates_and_shows_samples(qwen, tmp_path):
    """PPO against a reward model on your own prompts: eval/reward on the held-out prompts (it
    ran no evaluation before), and samples.jsonl shows what the policy wrote and its score."""
    conv = lambda role, c: [{"role": role, "content": c}]  # noqa: E731
    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": conv("user", "Hi"), "chosen": conv("assistant", "Hello"),
                                                "rejected": conv("assistant", "Go")}] * 8)
    cli.train("rm", ["--model", str(qwen), "--data", str(prefs), "--eval_data", str(prefs), "--max_steps", "1",
                 "--max_len", "64", "--device", "cpu", "--output_dir", str(tmp_path / "rm")])
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": conv("user", f"Say {w}")} for w in "abcdefgh"])
    out = tmp_path / "ppo"
    cli.train("ppo", ["--model", str(qwen), "--reward_model", str(tmp_path / "rm" / "final"), "--data", str(prompts),
              "--eval_data", str(prompts), "--engine", "hf", "--max_len", "64", "--max_new_tokens", "6",
              "--prompts_per_step", "4", "--steps", "2", "--eval_every", "1", "--log_samples_every", "1",
              "--device", "cpu", "--output_dir", str(out)])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/reward" in r for r in rows)  # steps 0, 1, 2
    shown = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in shown} == {1, 2} and all(isinstance(r["reward"], float) for r in shown)
    assert shown[0]["prompt"][0]["role"] == "user" and isinstance(shown[0]["completion"], str)


def test_grpo_in_bf16_gives_the_frozen_models_and_the_engine_the_compute_dtype(tmp_path, monkeypatch):
    """The reference (kl_coef > 0) and the engine get bf16; the policy keeps float32 masters;
    final/ is bf16; the step trains (finite loss, the policy moved)."""
    from fastrlhf import rollout

    seen = {}
    real_frozen, real_engine = models.load_frozen, rollout.make_engine
    monkeypatch.setattr(models, "load_frozen", lambda *a, **k: seen.setdefault("ref", real_frozen(*a, **k)))
    monkeypatch.setattr(grpo, "make_engine", lambda *a, **k: seen.setdefault("engine_dtype", k["dtype"])
                        and real_engine(*a, **k))
    base = ar.save_base_model(tmp_path / "base", **ar.MODEL_SIZES["tiny"])
    out = tmp_path / "g"
    cli.train("grpo", ["--model", str(base), "--output_dir", str(out), "--engine", "hf", "--dtype", "bfloat16",
               "--kl_coef", "0.1", "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "4",
               "--steps", "1", "--lr", "1e-3", "--task_prompts", "32", "--task_eval_prompts", "4",
               "--device", "cpu", *TOY])
    assert next(seen["ref"].parameters()).dtype == torch.bfloat16 and seen["engine_dtype"] == torch.bfloat16
    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert torch.isfinite(torch.tensor(row["loss/policy"])) and row["kl"] >= 0
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_float16_trains_with_a_loss_scale(tmp_path):
    base = ar.save_base_model(tmp_path / "base", **ar.MODEL_SIZES["tiny"])
    summary = cli.train("sft", ["--model", str(base), "--output_dir", str(tmp_path / "o"), "--task_examples", "64",
                        "--tokens_per_step", "64", "--max_steps", "3", "--lr", "2e-3", "--eval_every", "3",
                        "--log_samples", "0", "--device", "cpu", "--dtype", "float16", *TOY])
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss/sft"])) for r in rows)
    assert rows[-1]["loss/sft"] < rows[0]["loss/sft"]  # it trained: steps were not all overflows
    assert summary.get("skipped_overflow", 0) < 3
    assert json.loads((tmp_path / "o" / "final" / "config.json").read_text())["dtype"] == "float16"
