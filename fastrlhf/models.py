"""Loading Hugging Face models, the packed-sequence attention, value heads and log-probs.

Attention backend. Training runs on packed micro-batches (data.pack): several sequences in
one row, position ids restarting at 0, cu_seqlens their boundaries. transformers' own sdpa and
eager paths do not keep packed sequences apart (checked: the second of two packed sequences
differs from running it alone by 0.6 in the logits), so we register our attention function
"fastrlhf_varlen":
  - CUDA with flash-attn installed: flash_attn_varlen_func over cu_seqlens (no padding, no
    (T, T) mask);
  - otherwise (CPU, or no flash-attn): the packed row is split into its sequences, padded to
    the longest, and run through PyTorch SDPA with a causal + key-padding mask (sum of L^2
    work, not (total tokens)^2). Unpacked (padded) batches use transformers' usual mask.
Log-probs. Training never materialises the (B, T, V) logits: `token_logprobs` runs the
backbone for the last hidden state and calls fastrlhf.kernels.linear_logprob with the lm_head
weight.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from fastrlhf.kernels import linear_logprob
from fastrlhf.runtime import atomic_dir

ATTN = "fastrlhf_varlen"
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _sequence_index(cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens (n + 1,) -> (index (n, L) into the packed tokens, valid (n, L) bool), L = max_len."""
    pos = torch.arange(max_len, device=cu.device)
    lengths = (cu[1:] - cu[:-1]).long()
    valid = pos[None] < lengths[:, None]
    return torch.where(valid, cu[:-1, None].long() + pos[None], 0), valid


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function. query (B, heads, T, hd), key/value (B, kv_heads, T, hd)
    -> ((B, T, heads, hd), None). Packed when called with cu_seq_lens_q (see forward_packed)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # an ordinary (padded / generation) batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if query.is_cuda and _HAS_FLASH:
        from flash_attn import flash_attn_varlen_func

        B, h, T, d = query.shape
        q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], d) for x in (query, key, value))
        max_len = kwargs["max_length_q"]
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout,
                                     softmax_scale=scaling, causal=True)
        return out.view(B, T, h, d), None
    # no varlen kernel: unpack the row into (n, L) padded sequences, causal SDPA with a key
    # padding mask, pack back. Work is sum over sequences of L^2, not (total tokens)^2 as a
    # block-diagonal mask over the whole packed row would cost
    idx, valid = _sequence_index(cu, kwargs["max_length_q"])  # (n, L)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    q, k, v = (x[0][:, idx].transpose(0, 1) for x in (query, key, value))  # (n, heads, L, hd)
    L = idx.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    mask = causal[None, None] & valid[:, None, None, :]  # (n, 1, L, L)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)  # (n, heads, L, hd)
    packed = out.new_empty(query.shape[2], query.shape[1], query.shape[3])  # (T, heads, hd), SDPA's dtype (autocast)
    packed[idx[valid]] = out.transpose(1, 2)[valid]
    return packed[None], None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would drown the trainers' own
    hf_logging.set_verbosity_error()  # and the load report of a fresh value head is expected
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, varlen_attention)
    AttentionMaskInterface.register(ATTN, sdpa_mask)


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path}: the model directory has no tokenizer "
                                "(tokenizer.json / tokenizer_config.json); save one beside the weights")
    return path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_model_dir(path))


def load_causal_lm(path: str | Path, *, device="cpu", dtype=None, gradient_checkpointing=False):
    """An AutoModelForCausalLM from an HF directory, with the packed attention function."""
    from transformers import AutoModelForCausalLM

    _register_attention()
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(path),
                                                 dtype=dtype or default_dtype(device),
                                                 attn_implementation=ATTN)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device)


def load_value_model(path: str | Path, *, device="cpu", dtype=None, gradient_checkpointing=False):
    """A scalar head on the backbone (AutoModelForSequenceClassification, num_labels=1): the
    reward model and the PPO critic. From a causal-LM directory the head starts at zero, so
    initial values are 0; from a saved reward model it is loaded. Saves as a standard HF
    sequence-classification directory."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    _register_attention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some weights newly initialized": the head, on purpose
        model = AutoModelForSequenceClassification.from_pretrained(
            check_model_dir(path), num_labels=1, dtype=dtype or default_dtype(device),
            attn_implementation=ATTN)
    if not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        nn.init.zeros_(model.score.weight)  # a fresh head: every value starts at 0
    model.config.reward_head = "value"  # a critic built from a log-prob reward model is a value model
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device)


def _packed_kwargs(batch: dict) -> dict:
    """Model kwargs for a packed micro-batch from data.pack (cu_seqlens select varlen attention)."""
    cu = batch["cu_seqlens"].to(batch["input_ids"].device)
    return dict(position_ids=batch["position_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"])


def hidden_states(model, batch: dict) -> torch.Tensor:
    """Last hidden state (B, T, H) of the backbone for a packed or padded batch."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if "cu_seqlens" in batch:
        out = backbone(input_ids=batch["input_ids"], **_packed_kwargs(batch))
    else:
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.last_hidden_state


def token_logprobs(model, batch: dict, *, temperature=1.0, return_entropy=False, impl=None):
    """log p(labels[t] | tokens <= t) for every position (0 where labels == -100), float32,
    through linear_logprob on the last hidden state: the logits are never materialised."""
    h = hidden_states(model, batch)  # (B, T, H)
    return linear_logprob(h, model.get_output_embeddings().weight, batch["labels"].to(h.device),
                          temperature=temperature, return_entropy=return_entropy, impl=impl)


def per_sequence(token_values: torch.Tensor, batch: dict, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean) over each packed sequence's target positions (labels != -100) -> (n_seq,)."""
    keep = (batch["labels"] != -100).to(token_values.device)[0]
    lengths = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).long().to(token_values.device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=token_values.device), lengths)
    x = torch.where(keep, token_values[0], 0.0)
    sums = torch.zeros(len(lengths), dtype=x.dtype, device=x.device).index_add(0, seg, x)
    if not average:
        return sums
    counts = torch.zeros(len(lengths), dtype=x.dtype, device=x.device).index_add(0, seg, keep.to(x.dtype))
    return sums / counts.clamp(min=1)


def token_values(model, batch: dict) -> torch.Tensor:
    """Per-position scalar head outputs (B, T) float32 of a value / reward model."""
    return model.score(hidden_states(model, batch)).squeeze(-1).float()


def sequence_end_values(model, batch: dict) -> torch.Tensor:
    """The value at each sequence's last token: the reward of a reward model. (n_seq,)"""
    v = token_values(model, batch)  # (1, total) packed, or (B, T) padded
    if "cu_seqlens" in batch:
        return v[0, batch["cu_seqlens"][1:].long().to(v.device) - 1]
    last = batch["attention_mask"].sum(dim=1) - 1
    return v.gather(1, last[:, None].to(v.device)).squeeze(1)


REWARD_HEADS = ("value", "logprob")


def reward_head(path: str | Path) -> str:
    """Which kind of reward model an HF directory holds: config.json's "reward_head" (written by
    fastrlhf rm), else "value" (any sequence-classification model, e.g. one trained by TRL)."""
    import json

    head = json.loads((check_model_dir(path) / "config.json").read_text()).get("reward_head", "value")
    if head not in REWARD_HEADS:
        raise ValueError(f"{path}/config.json: reward_head {head!r} is not one of {REWARD_HEADS}")
    return head


def load_reward_model(path: str | Path, *, device="cpu", dtype=None):
    """A trained reward model, frozen, whichever its head (see sequence_rewards)."""
    load = load_causal_lm if reward_head(path) == "logprob" else load_value_model
    return load(path, device=device, dtype=dtype).eval().requires_grad_(False)


def token_rewards(model, batch: dict) -> torch.Tensor:
    """A logprob reward model's per-token rewards beta * log p(labels[t]) (B, T) float32, 0 where
    labels == -100: their sum over a response is its sequence reward."""
    if getattr(model.config, "reward_head", "value") != "logprob":
        raise ValueError("per-token rewards need a logprob reward model (fastrlhf rm --head logprob)")
    return model.config.reward_beta * token_logprobs(model, batch)


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """The reward of each sequence in a packed batch (n_seq,), by the model's head:
      value    the scalar head at the sequence's last token (TRL / OpenRLHF reward models);
      logprob  beta * log p(response | prompt) under the model's own LM head, summed over the
               response tokens (labels != -100): a generative, reference-free reward model
               whose score is read where a language model keeps what it knows (the LM head's
               comparison of each token with its prediction), through linear_logprob."""
    if getattr(model.config, "reward_head", "value") == "logprob":
        return per_sequence(token_rewards(model, batch), batch)
    return sequence_end_values(model, batch)


def save_hf_dir(model, tokenizer, out_dir: str | Path) -> None:
    """config + safetensors + tokenizer into out_dir (not atomic: see save_pretrained_atomic)."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def save_pretrained_atomic(model, tokenizer, out_dir: str | Path) -> Path:
    """An HF directory written to a sibling temp dir and renamed into place: a crash mid-write
    never leaves a half-written model under out_dir."""
    with atomic_dir(out_dir) as tmp:
        save_hf_dir(model, tokenizer, tmp)
    return Path(out_dir)
