"""What a careless or unlucky run does to the trainers: settings that cannot be right, damaged
or poisoned checkpoints, a changed command line on rerun, a full disk, hostile data. Each is
refused with one line naming the problem, or survived, and never corrupts a checkpoint or
writes a NaN final/."""

import json
import shutil

import pytest
import torch

from fastrlhf import checkpoints, cli, data, label, models, optim
from fastrlhf.tasks import arithmetic as ar

TINY = ["--task_examples", "120", "--task_model_size", "tiny", "--tokens_per_step", "64", "--warmup_steps", "1",
        "--lr", "2e-3", "--task_eval_prompts", "4", "--device", "cpu", "--max_len", "64",
        "--tokens_per_micro_batch", "4096", "--log_samples", "0"]


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flag,message", [
    (["--grad_clip", "-1"], "grad_clip=-1.0: expected > 0"),  # trained uphill before (loss 2.81 -> 7.33)
    (["--lr", "inf"], "lr=inf: expected a finite number > 0"),  # wrote all-NaN weights to final/
    (["--weight_decay", "nan"], "weight_decay=nan: expected a finite number >= 0"),
    (["--save_every", "-1"], "save_every=-1: expected >= 0"),
    (["--max_steps", "-5"], "max_steps=-5: expected >= 0"),
    (["--epochs", "0"], "epochs=0: expected >= 1"),
    (["--schedule", "cosin"], "schedule='cosin': expected one of ['cosine', 'linear', 'constant']"),
    (["--resume", "maybe"], "resume='maybe': expected one of ['auto', 'never', 'must']"),
])
def test_settings_are_refused_before_anything_is_written(flag, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["sft", *TINY, "--output-dir", str(out), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing loaded or written


def test_every_trainer_validates_its_fields(tmp_path, capsys):
    for command, flag, message in (("rm", ["--beta", "0"], "beta=0.0: expected > 0"),
                                   ("dpo", ["--label_smoothing", "0.5"],
                                    "label_smoothing=0.5: expected >= 0 and < 0.5"),
                                   ("grpo", ["--top_p", "0"], "top_p=0.0: expected > 0 and <= 1"),
                                   ("ppo", ["--lam", "1.5"], "lam=1.5: expected >= 0 and <= 1"),
                                   ("grpo", ["--dual_clip", "0.5"],
                                    "dual_clip=0.5: expected 0 (off) or a finite number > 1")):
        assert cli.main([command, "--output-dir", str(tmp_path / command), *flag]) == 2
        assert message in capsys.readouterr().err, (command, flag)


def _checkpointed_run(tmp_path, name="a", steps=4):
    out = tmp_path / name
    cli.train("sft", TINY + ["--output_dir", str(out), "--max_steps", str(steps), "--save_every", "2",
                             "--eval_every", "100"])
    return out


def test_a_nan_checkpoint_is_refused_and_no_nan_final_is_written(tmp_path, capsys):
    out = _checkpointed_run(tmp_path)
    shutil.rmtree(out / "final")
    from safetensors.torch import load_file, save_file

    weights = out / "checkpoints" / "step-2" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name][0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    shutil.rmtree(out / "checkpoints" / "step-4", ignore_errors=True)  # step-2 is the newest
    assert cli.main(["sft", *TINY, "--output-dir", str(out), "--max_steps", "4", "--save_every", "2",
                     "--eval_every", "100"]) == 2
    assert "holds NaN or inf" in capsys.readouterr().err
    assert not (out / "final").exists()


def test_a_run_whose_steps_are_all_skipped_stops_without_final(tmp_path, monkeypatch, capsys):
    real = models.token_logprobs
    monkeypatch.setattr(models, "token_logprobs", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "nan"
    assert cli.main(["sft", *TINY, "--output-dir", str(out), "--max_steps", "3", "--eval_every", "100"]) == 2
    assert "every one of the 3 optimiser steps was skipped" in capsys.readouterr().err
    assert not (out / "final").exists()
    monkeypatch.setattr(optim, "MAX_SKIPPED_IN_A_ROW", 2)  # a long run stops as soon as it is hopeless
    assert cli.main(["sft", *TINY, "--output-dir", str(tmp_path / "n2"), "--max_steps", "50",
                     "--eval_every", "100"]) == 2
    assert "2 optimiser steps in a row had a non-finite loss" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["weights", "state"])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumed(damage, tmp_path, capsys):
    full = _checkpointed_run(tmp_path, "full", steps=6)
    out = tmp_path / "crashed"
    for step in (2, 4):  # a run that crashed while its step-4 checkpoint was being written
        shutil.copytree(full / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    shutil.copy(full / "config.json", out / "config.json")
    shutil.copy(full / "metrics.jsonl", out / "metrics.jsonl")
    victim = out / "checkpoints" / "step-4" / ("model.safetensors" if damage == "weights" else "trainer_state.pt")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert checkpoints.damaged(out / "checkpoints" / "step-4")
    assert checkpoints.damaged(out / "checkpoints" / "step-2") is None
    cli.train("sft", TINY + ["--output_dir", str(out), "--max_steps", "6", "--save_every", "2", "--eval_every", "100"])
    assert "step-4 is damaged" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-4.damaged").exists()
    resumed, ref = _rows(out), _rows(full)
    assert [r["step"] for r in resumed] == list(range(1, 7))  # steps 3-6 rerun from step 2
    assert [r["loss/sft"] for r in resumed] == pytest.approx([r["loss/sft"] for r in ref], abs=1e-6)


def test_a_torn_last_metrics_row_does_not_block_resume(tmp_path):
    out = _checkpointed_run(tmp_path, steps=4)
    shutil.rmtree(out / "checkpoints" / "step-4", ignore_errors=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/sft": 0.')  # a crash mid-write
    cli.train("sft", TINY + ["--output_dir", str(out), "--max_steps", "4", "--save_every", "2", "--eval_every", "100"])
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def test_rerunning_with_other_settings_is_refused_or_starts_over(tmp_path, capsys):
    out = _checkpointed_run(tmp_path, steps=4)
    shutil.rmtree(out / "checkpoints" / "step-4", ignore_errors=True)
    args = ["sft", *TINY, "--output-dir", str(out), "--max_steps", "4", "--save_every", "2", "--eval_every", "100"]
    assert cli.main([*args, "--lr", "1e-4", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "lr=0.002 (now 0.0001)" in err and "seed=0 (now 3)" in err and "--resume never" in err
    assert cli.main([*args, "--eval_every", "2", "--max_steps", "5"]) == 0  # how often and how long may change
    assert cli.main([*args, "--lr", "1e-4", "--resume", "never"]) == 0  # starts over
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4] and not (out / "checkpoints" / "step-4").exists()
    assert cli.main(["sft", *TINY, "--output-dir", str(tmp_path / "empty"), "--resume", "must"]) == 2
    assert "resume=must but" in capsys.readouterr().err


def test_a_full_disk_is_named_and_leaves_no_half_checkpoint(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 683264 vs 683152")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 4096, "total": 1, "used": 1})())
    out = tmp_path / "full"
    assert cli.main(["sft", *TINY, "--output-dir", str(out), "--max_steps", "3", "--save_every", "2",
                     "--eval_every", "100"]) == 2
    err = capsys.readouterr().err
    assert "no space left on device writing" in err and "step-2" in err
    assert not list((out / "checkpoints").glob("step-2*"))  # no step-2.tmp left half-written


def test_a_data_error_leaves_no_base_model_behind(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": 2}\n')
    out = tmp_path / "o"
    assert cli.main(["sft", "--data", str(bad), "--output-dir", str(out), "--device", "cpu"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not (out / "base").exists()


# ---------------------------------------------------------------- data


def test_bad_utf8_and_non_message_prompts_name_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"p.jsonl:2: not valid UTF-8"):
        data.load_prompts(p)
    p.write_text('{"prompt": "ok"}\n{"prompt": [1, 2, 3]}\n')
    with pytest.raises(data.DataError, match=r"p.jsonl:2: 'prompt' must be a non-empty list of"):
        data.load_prompts(p)


def test_a_huge_record_is_cut_before_tokenising(tmp_path):
    """A 50 MB response to a 64-token max_len used 11.8 GB while being tokenised in full."""
    tok = ar.build_tokenizer()
    calls = []
    real = tok.__class__.__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **k):
            calls.append(len(text))
            return real(self, text, *a, **k)

    tok.__class__ = Spy
    ids, labels = data.tokenize_pair(tok, "1+1=", "7" * 5_000_000, 64, counts := data.Truncations())
    assert len(ids) == 64 and counts.truncated == 1
    assert max(calls) <= 64 * data.MAX_CHARS_PER_TOKEN


def test_identical_pairs_are_skipped_and_held_out_splits_are_disjoint(tmp_path):
    rows = [{"prompt": f"q{i % 30}", "chosen": "a", "rejected": "b"} for i in range(90)]  # each prompt 3 times
    rows += [{"prompt": "same", "chosen": "x", "rejected": "x"}] * 5
    p = tmp_path / "prefs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="5 pairs whose chosen and rejected are the same skipped"):
        pairs = data.load_preferences(p)
    assert len(pairs) == 90
    train, held = data.split_heldout(pairs)
    assert held and train and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert (train, held) == data.split_heldout(pairs)  # deterministic
    assert len(held) == 3 * len({r["prompt"] for r in held})  # a prompt's duplicates stay together


def test_prompt_less_sft_records_are_held_out_by_their_content(tmp_path):
    """{"messages"} and {"text"} records have no prompt of their own: they are split by their first
    user turn (a system prompt every conversation shares does not make them one) and their text;
    conversations asking the same first question stay on one side. Before: 'too few to hold any
    out; give eval data' (every such record's prompt was empty)."""
    system = {"role": "system", "content": "You are a helpful assistant."}
    convs = [[system, {"role": "user", "content": f"question {i % 20}"}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(60)]  # each first question 3 times, answered differently
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    records = data.load_sft(p)
    train, held = data.split_heldout(records)
    question = lambda r: r["response"][1]["content"]  # noqa: E731
    assert held and train and not {question(r) for r in train} & {question(r) for r in held}
    assert len(held) == 3 * len({question(r) for r in held}) and len(train) + len(held) == 60
    texts = tmp_path / "text.jsonl"
    texts.write_text("".join(json.dumps({"text": f"line {i % 25}"}) + "\n" for i in range(50)))
    train, held = data.split_heldout(data.load_sft(texts))
    assert held and train and not {r["response"] for r in train} & {r["response"] for r in held}
    # one prompt repeated: split by position, said; a single record: nothing to hold out
    same = [{"prompt": "q", "response": f"r{i}"} for i in range(40)]
    with pytest.warns(UserWarning, match="all share one prompt"):
        train, held = data.split_heldout(same)
    assert (len(train), len(held)) == (38, 2) and held == same[-2:]
    with pytest.raises(data.DataError, match="1 record: nothing to hold out"):
        data.split_heldout(same[:1])


def test_duplicate_ids_in_a_labelling_file_are_refused(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"id": "x1", "prompt": "q", "a": "1", "b": "2"}) + "\n"
                 + json.dumps({"id": "x1", "prompt": "q2", "a": "3", "b": "4"}) + "\n")
    with pytest.raises(data.DataError, match=r"pairs.jsonl:2: pair id 'x1' was already used at .*pairs.jsonl:1"):
        label.load_pairs(p)


def test_the_demo_says_before_it_starts_when_it_cannot_draw(tmp_path, monkeypatch, capsys):
    import importlib.util

    from fastrlhf import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(demo, "run_stage",
                        lambda *a, **k: (_ for _ in ()).throw(SystemExit("stopped at the first stage")))
    with pytest.raises(SystemExit, match="stopped at the first stage"):
        demo.main(["--output-dir", str(tmp_path / "d"), "--fast"])
    assert "matplotlib is not installed" in capsys.readouterr().err
