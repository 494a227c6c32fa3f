"""The built-in task, the data layer and the model helpers (tiny model, CPU)."""

import json
import random

import pytest
import torch

from fastrlhf import data, models
from fastrlhf.tasks import arithmetic as ar


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return ar.save_base_model(tmp_path_factory.mktemp("m") / "base")


# ---------------------------------------------------------------- task


def test_splits_are_disjoint_and_deterministic():
    task = ar.ArithmeticTask()
    train, test = task.split(2000, "train"), task.split(200, "test")
    assert not set(train) & set(test)
    assert train == task.split(2000, "train")


def test_asking_for_more_than_a_split_holds_returns_all_of_it():
    """(an infinite loop before: the split stopped only on a count it never reached)"""
    task = ar.ArithmeticTask()
    test, train = task.split(5000, "test"), task.split(20000, "train")
    everything = {(a, b) for a in range(100) for b in range(100)}
    assert len(set(test)) == len(test) == task.split_size("test")
    assert set(test) | set(train) == everything and not set(test) & set(train)
    assert test[:200] == task.split(200, "test")  # the prefix does not depend on n


def test_wrong_answers_are_wrong_and_close():
    rng = random.Random(0)
    for a, b in ar.ArithmeticTask().split(300, "train"):
        w = ar.wrong_answer(a, b, rng)
        assert w != a + b and abs(w - (a + b)) <= 100


def test_sft_error_rate_and_annotator_noise():
    task = ar.ArithmeticTask()
    sft = ar.sft_examples(task, 2000, error_rate=0.15)
    wrong = sum(int(r["response"]) != eval(r["prompt"][:-1]) for r in sft) / len(sft)
    assert 0.12 < wrong < 0.18
    pairs = ar.preference_pairs(task, 2000, label_noise=0.1)
    # the annotator's choice agrees with "closer to the truth" except for the noise (and ties)
    agree = sum(abs(int(p["chosen"]) - eval(p["prompt"][:-1])) <= abs(int(p["rejected"]) - eval(p["prompt"][:-1]))
                for p in pairs) / len(pairs)
    assert 0.85 < agree < 0.95
    # two demonstrators' different answers: one of them is the sum unless both erred
    # (P = 2 * 0.85 * 0.15 / (1 - 0.85^2 - P(same mistake)) ~ 0.93)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    has_sum = sum(str(eval(p["prompt"][:-1])) in (p["chosen"], p["rejected"]) for p in pairs) / len(pairs)
    assert 0.88 < has_sum < 0.98


def test_sampled_accuracy_matches_the_model_distribution(base_dir):
    """A model whose next-token distribution is known exactly: an untrained one with the lm_head
    zeroed is uniform over the 16 tokens, so a sample's first token is the first answer digit
    with probability 1/16. Greedy is deterministic and ignores the seed; sampling is seeded."""
    import torch

    model, tok = models.load_causal_lm(base_dir), models.load_tokenizer(base_dir)
    torch.nn.init.zeros_(model.lm_head.weight)
    heldout = ar.heldout_prompts(ar.ArithmeticTask(), 50)
    prompts = [r["prompt"] for r in heldout]
    drawn = ar.answers(model, tok, prompts, max_new_tokens=1, temperature=1.0, samples=8, seed=3)
    assert [len(d) for d in drawn] == [8] * 50
    firsts = [o[:1] for outs in drawn for o in outs]  # special tokens decode to ""
    hit = sum(o[:1] == r["answer"][0] for outs, r in zip(drawn, heldout) for o in outs) / 400
    assert abs(hit - 1 / 16) < 3 * (1 / 16 * 15 / 16 / 400) ** 0.5  # within 3 standard errors
    assert len(set(firsts)) > 8  # many different tokens, not one repeated
    assert drawn == ar.answers(model, tok, prompts, max_new_tokens=1, temperature=1.0, samples=8, seed=3)
    assert drawn != ar.answers(model, tok, prompts, max_new_tokens=1, temperature=1.0, samples=8, seed=4)
    assert ar.answers(model, tok, prompts[:3]) == ar.answers(model, tok, prompts[:3], seed=9)


def test_exact_match():
    assert ar.exact_match("1+2=", "3</s>", "3") == 1.0
    assert ar.exact_match("1+2=", "33", "3") == 0.0


def test_tokenizer_round_trip(base_dir):
    tok = models.load_tokenizer(base_dir)
    ids = tok("37+58=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "37+58="


# ---------------------------------------------------------------- data


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "1+2=", "response": 3}\n')
    with pytest.raises(data.DataError,
                       match=r"sft.jsonl:2: field 'response' must be a string or a list of messages, got int"):
        data.load_sft(p)
    p.write_text('{"prompt": "1+1=", "response": "2"}\n\n{"prompt": "1+2=" "response"}\n')
    with pytest.raises(data.DataError, match=r"sft.jsonl:3: invalid JSON"):
        data.load_sft(p)
    p.write_text('{"prompt": "1+1="}\n')
    with pytest.raises(data.DataError, match=r"sft.jsonl:1: missing field 'response'"):
        data.load_sft(p)
    p.write_text("\n")
    with pytest.raises(data.DataError, match=r"sft.jsonl: no records"):
        data.load_sft(p)


def test_rankings_become_pairs_and_messages_are_read(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"prompt": "q", "responses": ["a", "b", "c"]}) + "\n"
                 + json.dumps({"prompt": "q2", "chosen": "x", "rejected": "y"}) + "\n")
    pairs = data.load_preferences(p)
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("a", "b"), ("a", "c"), ("b", "c"), ("x", "y")]
    s = tmp_path / "msgs.jsonl"
    s.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "yo"}]}) + "\n")
    assert data.load_sft(s) == [{"prompt": [], "response": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}]


def test_loss_mask_covers_response_only_and_truncation_is_counted(base_dir):
    tok = models.load_tokenizer(base_dir)
    counts = data.Truncations()
    ids, labels = data.tokenize_pair(tok, "37+58=", "95", 64, counts)
    assert len(ids) == 7 + 3  # <s> 3 7 + 5 8 = | 9 5 </s>
    assert labels[:7] == [data.IGNORE] * 7 and labels[7:] == ids[7:]
    assert ids[-1] == tok.eos_token_id
    assert data.tokenize_pair(tok, "37+58=", "95", 8, counts) == (ids[:8], labels[:8])
    assert data.tokenize_pair(tok, "37+58=", "95", 7, counts) is None
    assert (counts.truncated, counts.skipped) == (1, 1)


def test_pack_respects_budget_and_shifts_labels():
    seqs = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9])]
    batches = data.pack(seqs, max_tokens=5)
    assert [b["seq_index"] for b in batches] == [[0, 1], [2]]
    b = batches[0]
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5]
    assert b["labels"].tolist() == [[2, 3, -100, 5, -100]]  # next-token targets, none across the seam
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens, more than max_tokens=2"):
        data.pack(seqs, max_tokens=2)


# ---------------------------------------------------------------- models


def test_model_dir_without_tokenizer_is_a_clear_error(tmp_path):
    ar.build_model().save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        models.load_causal_lm(tmp_path / "m")


def test_packed_equals_padded_loss_and_gradients(base_dir):
    """Packed sequences are isolated: same per-token log-probs and gradients as padding
    (in float64, so any cross-sequence leak shows far above rounding)."""
    torch.manual_seed(0)
    model = models.load_causal_lm(base_dir, dtype=torch.float64)
    tok = models.load_tokenizer(base_dir)
    counts = data.Truncations()
    seqs = [data.tokenize_pair(tok, p, r, 64, counts)
            for p, r in [("37+58=", "95"), ("1+2=", "3"), ("99+99=", "198"), ("5+60=", "65")]]
    packed = data.pack(seqs, max_tokens=64)
    assert len(packed) == 1
    padded = data.pad_batch(seqs, tok.pad_token_id)

    def token_logprobs(batch):  # float64 log-probs (linear_logprob takes fp32/bf16/fp16 only)
        logits = model.lm_head(models.hidden_states(model, batch))
        labels = batch["labels"]
        lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return torch.where(labels != -100, lp, 0.0)

    lp_packed = token_logprobs(packed[0])  # (1, total)
    loss_p = -lp_packed.sum()
    g_p = torch.autograd.grad(loss_p, list(model.parameters()))
    lp_padded = token_logprobs(padded)  # (B, T)
    loss_d = -lp_padded.sum()
    g_d = torch.autograd.grad(loss_d, list(model.parameters()))

    flat = torch.cat([lp_padded[b, : len(x)] for b, (x, _) in enumerate(seqs)])
    torch.testing.assert_close(lp_packed[0], flat.to(lp_packed.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_p, g_d):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_packed_attention_under_bf16_autocast(base_dir):
    """Under autocast SDPA returns bf16 while the query may be float32: the packed path used to
    allocate its output in the query's dtype and fail on the copy. Packed and padded agree to
    bf16 rounding (both autocast) and stay within bf16 error of the float32 log-probs."""
    model = models.load_causal_lm(base_dir)
    tok = models.load_tokenizer(base_dir)
    seqs = [data.tokenize_pair(tok, p, r, 64, data.Truncations())
            for p, r in [("37+58=", "95"), ("1+2=", "3"), ("99+99=", "198")]]
    packed, padded = data.pack(seqs, max_tokens=64)[0], data.pad_batch(seqs, tok.pad_token_id)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp_packed = models.token_logprobs(model, packed)[0]  # (total,)
            lp_padded = models.token_logprobs(model, padded)  # (B, T)
        lp_fp32 = models.token_logprobs(model, packed)[0]
    flat = torch.cat([lp_padded[b, : len(x)] for b, (x, _) in enumerate(seqs)])
    assert lp_packed.dtype == torch.float32 and (lp_packed != 0).sum() == (packed["labels"] != -100).sum()
    torch.testing.assert_close(lp_packed, flat, rtol=0, atol=0.05)
    torch.testing.assert_close(lp_packed, lp_fp32, rtol=0, atol=0.1)
    assert (lp_packed - lp_fp32).abs().max() > 0  # bf16 really ran


def test_token_logprobs_match_materialised_logits(base_dir):
    model = models.load_causal_lm(base_dir)
    tok = models.load_tokenizer(base_dir)
    seq = data.tokenize_pair(tok, "12+34=", "46", 64, data.Truncations())
    batch = data.pad_batch([seq], tok.pad_token_id)
    with torch.no_grad():
        ours = models.token_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits.double()
        labels = batch["labels"]
        ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        ref = torch.where(labels != -100, ref, 0.0)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_value_model_starts_at_zero_and_reads_sequence_ends(base_dir, tmp_path):
    vm = models.load_value_model(base_dir)
    tok = models.load_tokenizer(base_dir)
    seqs = [data.tokenize_pair(tok, "1+2=", "3", 64, data.Truncations()),
            data.tokenize_pair(tok, "10+20=", "30", 64, data.Truncations())]
    packed = data.pack(seqs, 64)[0]
    assert torch.all(models.sequence_end_values(vm, packed) == 0)
    torch.nn.init.normal_(vm.score.weight)
    with torch.no_grad():
        r_packed = models.sequence_end_values(vm, packed)
        r_padded = models.sequence_end_values(vm, data.pad_batch(seqs, tok.pad_token_id))
    torch.testing.assert_close(r_packed, r_padded, rtol=1e-5, atol=1e-5)
    out = models.save_pretrained_atomic(vm, tok, tmp_path / "rm")
    reloaded = models.load_value_model(out)  # a saved reward model keeps its head
    with torch.no_grad():
        torch.testing.assert_close(models.sequence_end_values(reloaded, packed), r_packed)
    assert not (tmp_path / "rm.tmp").exists()


def test_heldout_split_has_no_arithmetic_structure():
    """Held-out sums end in every digit (a linear split would hold out one residue class)."""
    test = ar.ArithmeticTask().split(300, "test")
    assert len({(a + b) % 10 for a, b in test}) == 10
    assert len(test) == 300


def test_logprob_reward_head_is_beta_times_the_response_loglikelihood(base_dir, tmp_path):
    """The generative reward: beta * sum of log p(response token) under the model's LM head,
    against the float64 log-softmax of materialised logits, sequence by sequence; saved with
    its head so load_reward_model reads it back; a critic made from it is a value model."""
    tok = models.load_tokenizer(base_dir)
    lm = models.load_causal_lm(base_dir)
    torch.manual_seed(0)
    for p in lm.parameters():  # a model with opinions (the built-in base is near uniform)
        p.data += 0.05 * torch.randn_like(p)
    lm.config.reward_head, lm.config.reward_beta = "logprob", 0.7
    pairs = [("1+2=", "3"), ("10+20=", "30"), ("99+99=", "198")]
    seqs = [data.tokenize_pair(tok, p, r, 64, data.Truncations()) for p, r in pairs]
    with torch.no_grad():
        ours = models.sequence_rewards(lm, data.pack(seqs, 64)[0])
        for i, (ids, labels) in enumerate(seqs):
            batch = data.pad_batch([(ids, labels)], tok.pad_token_id)
            logits = lm(input_ids=batch["input_ids"]).logits.double()[0]  # (T, V)
            lab = batch["labels"][0]
            keep = lab != -100
            ref = torch.log_softmax(logits, -1)[keep].gather(-1, lab[keep][:, None]).sum()
            assert keep.sum() == len(pairs[i][1]) + 1  # the answer's characters and the end token
            assert ours[i].item() == pytest.approx(0.7 * ref.item(), rel=1e-5, abs=1e-5)
    out = models.save_pretrained_atomic(lm, tok, tmp_path / "rm")
    assert models.reward_head(out) == "logprob"
    rm = models.load_reward_model(out)
    assert not any(p.requires_grad for p in rm.parameters())
    with torch.no_grad():
        torch.testing.assert_close(models.sequence_rewards(rm, data.pack(seqs, 64)[0]), ours)
    critic = models.load_value_model(out)  # PPO's critic from this reward model: a fresh value head
    assert critic.config.reward_head == "value"
    assert models.reward_head(base_dir) == "value"  # a directory without the field: a value model
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "reward_head": "pairwise"}))
    with pytest.raises(ValueError, match="config.json: reward_head 'pairwise'"):
        models.load_reward_model(out)


def test_chat_sums_splits_are_disjoint_sums_and_the_verifier_reads_the_last_number():
    """The real-model task: train and test prompts never share a question, each answer is the sum
    its question asks for (read back from the text), and the reward is the last number's match."""
    import re

    from fastrlhf.tasks import chat_sums

    train, test = chat_sums.prompts(300, "train"), chat_sums.prompts(60, "test")
    questions = lambda rows: [r["prompt"][0]["content"] for r in rows]  # noqa: E731
    assert len(set(questions(train))) == 300 and not set(questions(train)) & set(questions(test))
    assert chat_sums.prompts(60, "test") == test  # deterministic
    for r in train + test:
        a, b = map(int, re.findall(r"\d+", r["prompt"][0]["content"])[:2])
        assert r["answer"] == str(a + b)
    # bare sums and word problems drawn alternately, until the 144 bare sums' training share runs out
    assert 40 <= sum("How many" in q for q in questions(train)[:100]) <= 60
    assert sum("How many" not in q for q in questions(train)) <= 144
    with pytest.raises(ValueError, match="split 'dev'"):
        chat_sums.prompts(1, "dev")
    replies = ["3 + 5 = 8", "It is 8, not 9.", "1,008", "The answer is eight.", [{"role": "assistant", "content": "8"}]]
    assert chat_sums.reward(None, replies, ["8", "8", "1008", "8", "8"]) == [1.0, 0.0, 1.0, 0.0, 1.0]
    pairs = [{"prompt": json.dumps([{"role": "user", "content": "What is 3 + 5?"}]), "a": "7", "b": "so 8",
              "answer": "8"},
             {"prompt": "What is 1 + 1?", "a": "2", "b": "2", "answer": "2"},
             {"prompt": "What is 2 + 2?", "a": "4", "b": "5", "answer": "4"}]
    prefs, dropped = chat_sums.label_pairs(pairs)
    assert dropped == 1 and [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in prefs] == \
        [("so 8", "7"), ("4", "5")]
    assert prefs[0]["prompt"] == [{"role": "user",
                                   "content": "What is 3 + 5?"}] and prefs[1]["prompt"] == "What is 2 + 2?"
