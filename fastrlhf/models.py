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
backbone for the last hidden state and calls fastrlhf.kernels.linear_logprob with the output
layer as the architecture computes it (`output_head`: weight, Phi's bias, Gemma's final-logit
softcap, Cohere / Granite logit scales); an output transform we do not reproduce is refused at
load, and every float32 load checks our packed, fused log-probs against transformers' own
eager forward (`check_logprob_fidelity`) before anything trains on them.
Precision. Trained models are loaded in float32 (the master weights; forward passes run under
autocast in the run's compute dtype), frozen ones in the compute dtype (`load_frozen`).
LoRA (--lora_r > 0, fastrlhf.lora): the frozen base in the compute dtype, the adapters (and a
fully trained output layer or value head) float32; the reference is the same model with its
adapters off; final/ is the merged model with the adapter in final/adapter/, checkpoints the
adapter alone.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastrlhf import hub, lora
from fastrlhf.kernels import linear_logprob
from fastrlhf.files import atomic_dir

ATTN = "fastrlhf_varlen"
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _sequence_index(cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens (n + 1,) -> (index (n, L) into the packed tokens, valid (n, L) bool), L = max_len."""
    pos = torch.arange(max_len, device=cu.device)
    lengths = (cu[1:] - cu[:-1]).long()
    valid = pos[None] < lengths[:, None]
    return torch.where(valid, cu[:-1, None].long() + pos[None], 0), valid


def _math_attention(q, k, v, keep, scaling, softcap, dropout):
    """Attention written out, for what SDPA cannot do (logit softcapping, Gemma 2):
    q (n, heads, L, hd), k / v (n, heads, S, hd), keep (n | 1, 1 | heads, L, S) bool."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scaling  # (n, heads, L, S)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0).to(v.dtype)
    if dropout:
        p = torch.nn.functional.dropout(p, p=dropout)
    return torch.matmul(p, v)  # (n, heads, L, hd)


def _causal_keep(L: int, S: int, window: int | None, device) -> torch.Tensor:
    """(L, S) bool: query i (the last L of S positions) sees key j <= i, and j > i - window."""
    i = torch.arange(S - L, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    keep = j <= i
    return keep & (j > i - window) if window else keep


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     softcap=None, sliding_window=None, **kwargs):
    """transformers attention function. query (B, heads, T, hd), key/value (B, kv_heads, T, hd)
    -> ((B, T, heads, hd), None). Packed when called with cu_seq_lens_q (see forward_packed).
    Reproduces what the architectures pass: scaling, dropout, attention-logit softcapping
    (Gemma 2's attn_logit_softcapping) and sliding windows (Mistral, Gemma 2, Qwen2 when on:
    query i sees keys j with i - j < window)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__}: attention sinks (s_aux) are not supported "
                                  "by fastrlhf's packed attention")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # an ordinary (padded / generation) batch
        if not softcap:  # SDPA with transformers' mask (padding, sliding window already in it)
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        if groups > 1:
            key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        keep = attention_mask if attention_mask is not None else \
            _causal_keep(query.shape[2], key.shape[2], sliding_window, query.device)[None, None]
        if keep.dtype != torch.bool:  # an additive float mask
            keep = keep == 0
        out = _math_attention(query, key, value, keep, scaling, softcap, dropout)
        return out.transpose(1, 2).contiguous(), None
    if query.is_cuda and _HAS_FLASH and query.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_varlen_func

        B, h, T, d = query.shape
        q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], d) for x in (query, key, value))
        max_len = kwargs["max_length_q"]
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout,
                                     softmax_scale=scaling, causal=True, softcap=softcap or 0.0,
                                     window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1))
        return out.view(B, T, h, d), None
    # no varlen kernel: unpack the row into (n, L) padded sequences, causal SDPA with a key
    # padding mask, pack back. Work is sum over sequences of L^2, not (total tokens)^2 as a
    # block-diagonal mask over the whole packed row would cost
    idx, valid = _sequence_index(cu, kwargs["max_length_q"])  # (n, L)
    if groups > 1:
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    q, k, v = (x[0][:, idx].transpose(0, 1) for x in (query, key, value))  # (n, heads, L, hd)
    L = idx.shape[1]
    mask = _causal_keep(L, L, sliding_window, q.device)[None, None] & valid[:, None, None, :]  # (n, 1, L, L)
    if softcap:
        out = _math_attention(q, k, v, mask, scaling, softcap, dropout)
    else:
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


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path}: the model directory has no tokenizer "
                                "(tokenizer.json / tokenizer_config.json); save one beside the weights")
    return path


def load_tokenizer(path: str | Path):
    """The model directory's tokenizer (a PEFT adapter directory's own, else its base's); one
    without a pad token (Llama 3, Mistral) pads with its EOS token, as TRL does (padding is
    masked out everywhere it is used)."""
    from transformers import AutoTokenizer

    path = hub.resolve(path)  # a GGUF file (or a known name): its cached HF directory
    if lora.is_adapter_dir(path):
        if (Path(path) / "tokenizer_config.json").exists():
            return _pad_with_eos(AutoTokenizer.from_pretrained(path), path)
        path = lora.adapter_base(path)
    return _pad_with_eos(AutoTokenizer.from_pretrained(check_model_dir(path)), path)


def _pad_with_eos(tok, path):
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def disable_dropout(model) -> None:
    """Every dropout of the model to 0, in train mode too: nn.Dropout modules (GPT-2's resid /
    embd / attn_pdrop) and the attention-dropout rates modules pass to the attention function
    (Llama-family attention_dropout)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout_p", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def load_causal_lm(path: str | Path, *, device="cpu", dtype=torch.float32, gradient_checkpointing=False,
                   no_dropout: bool = False, verify: bool = True):
    """An AutoModelForCausalLM from an HF directory (or a PEFT adapter directory: its base with
    the adapter merged in), with the packed attention function. dtype: float32 for a trained
    model (the master weights), the compute dtype for a frozen one. verify (float32 only): check
    once that our packed, fused log-probs equal the model's own forward (check_logprob_fidelity)."""
    from transformers import AutoModelForCausalLM

    _register_attention()
    path = hub.resolve(path)  # a GGUF file (or a known name): its cached HF directory
    if lora.is_adapter_dir(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(check_model_dir(lora.adapter_base(path)), dtype=dtype,
                                                    attn_implementation=ATTN)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(check_model_dir(path), dtype=dtype, attn_implementation=ATTN)
    output_transform(model.config)  # refuse an output transform we do not reproduce, by its field
    if no_dropout:
        disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(device)
    if verify and dtype == torch.float32:
        check_logprob_fidelity(model, path)
    return model


def check_logprob_fidelity(model, path, *, tol: float = 1e-3) -> float:
    """Our packed-sequence, fused log-probs against transformers' own reference forward (eager
    attention, materialised logits) on two short random sequences, in float32: a model whose
    attention or output layer we do not reproduce is refused here, before any training, with
    the config fields that may be why. Returns the largest difference (nats)."""
    from fastrlhf.data import pack, to_device

    g = torch.Generator().manual_seed(0)
    V = model.get_output_embeddings().weight.shape[0]
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (11, 7)]
    mb = to_device(pack([(s, s) for s in seqs], 64)[0], model.device)
    was_training, impl = model.training, model.config._attn_implementation
    model.eval()
    try:
        with torch.no_grad():
            ours = token_logprobs(model, mb)[0]  # (total,)
            model.config._attn_implementation = "eager"
            worst, start = 0.0, 0
            for s in seqs:
                logits = model(input_ids=torch.tensor([s], device=model.device)).logits[0, :-1].float()
                ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s[1:], device=model.device)[:, None])[:, 0]
                worst = max(worst, (ours[start:start + len(s) - 1] - ref).abs().max().item())
                start += len(s)
    finally:
        model.config._attn_implementation = impl
        model.train(was_training)
    if not worst <= tol:
        config = _text_config(model.config)
        suspects = sorted(k for k, v in config.to_dict().items() if v not in (None, False) and any(
            w in k for w in ("softcap", "scal", "multiplier", "window", "logit", "sink")))
        raise ValueError(f"{path}: fastrlhf's log-probs for {type(model).__name__} differ from transformers' own "
                         f"forward by {worst:.3g} nats (config fields that may be why: "
                         f"{', '.join(suspects) or 'none'}); "
                         "refusing to train on wrong log-probs")
    return worst


def load_trained(path: str | Path, cfg, device, *, ckpt: Path | None = None, value: bool = False):
    """A model a trainer trains, from the directory `path` or, resuming, from the checkpoint
    directory `ckpt` (which replaces it: full weights, or with LoRA the adapters on path's
    base; checkpoints.weights(ckpt): a sharded checkpoint's shards are loaded later, with the
    optimiser state): float32
    master weights, with the run's gradient checkpointing and dropout settings (cfg:
    config.RunFields); with --lora_r the frozen base in the compute dtype and PEFT's adapters
    trained (fastrlhf.lora); sharded with FSDP2 under torchrun (shard); value=True: a scalar-head
    value model."""
    from fastrlhf import dist
    from fastrlhf.config import compute_dtype

    load = functools.partial(load_value_model if value else load_causal_lm, device=device,
                             gradient_checkpointing=cfg.gradient_checkpointing, no_dropout=cfg.disable_dropout)
    if lora.enabled(cfg):  # the base frozen in the compute dtype, the adapters fresh or the checkpoint's
        model = lora.apply(load(path, dtype=compute_dtype(cfg.dtype, device)), cfg, value=value, ckpt=ckpt)
    else:
        model = load(ckpt or path, dtype=torch.float32)
    check_finite_model(model, ckpt or path)  # a NaN checkpoint would skip every step and save NaN
    if dist.world_size() > 1:  # torchrun: the masters and (once built) AdamW's state sharded over the ranks
        shard(model, compute_dtype(cfg.dtype, device), offload=getattr(cfg, "fsdp_offload", False))
    return model


def check_finite_model(model, where) -> None:
    """Every parameter finite: a checkpoint or model holding NaN/inf is refused, named (it would
    skip every step, and be saved as NaN)."""
    bad = [name for name, p in model.named_parameters()
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]  # sharded: this rank's part
    if is_sharded(model):  # every rank decides alike: a NaN in another rank's shard stops this one too
        from fastrlhf import dist

        if dist.sum_over_ranks([len(bad)])[0] and not bad:
            bad = ["(in another rank's shard)"]
    if bad:
        raise ValueError(f"{where}: parameter {bad[0]} holds NaN or inf; it cannot be trained or saved")


def check_max_len(model, max_len: int) -> None:
    """max_len must fit the model's positions (learned position embeddings have no more rows)."""
    limit = getattr(_text_config(model.config), "max_position_embeddings", None) or \
        getattr(model.config, "n_positions", None)
    if limit and max_len > limit:
        raise ValueError(f"max_len={max_len} is longer than the model's max_position_embeddings={limit}")


def load_value_model(path: str | Path, *, device="cpu", dtype=torch.float32, gradient_checkpointing=False,
                     no_dropout: bool = False):
    """A scalar head on the backbone (AutoModelForSequenceClassification, num_labels=1): the
    reward model and the PPO critic. From a causal-LM directory the head starts at zero, so
    initial values are 0; from a saved reward model it is loaded. Saves as a standard HF
    sequence-classification directory."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    _register_attention()
    path = hub.resolve(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some weights newly initialized": the head, on purpose
        model = AutoModelForSequenceClassification.from_pretrained(
            check_model_dir(path), num_labels=1, dtype=dtype, attn_implementation=ATTN)
    if not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        nn.init.zeros_(model.score.weight)  # a fresh head: every value starts at 0
    model.config.reward_head = "value"  # a critic built from a log-prob reward model is a value model
    if no_dropout:
        disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


# ----------------------------------------------------------------------------------------
# the output layer, as each architecture computes it
# ----------------------------------------------------------------------------------------

# Config fields that change the logits after the lm_head matmul. Reproduced: final-logit
# softcapping (any architecture: cap * tanh(z / cap)), Cohere's logit_scale (z * s), Granite's
# logits_scaling (z / s), HyperCLOVA X's logits_scaling (z * s). Any other of these fields that is
# set, on any architecture, refuses the model at load: it would train on wrong log-probs.
OUTPUT_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                 "output_multiplier", "output_logits_scale", "logit_softcapping", "mup_width_multiplier")


@dataclass(frozen=True)
class OutputHead:
    """logits = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)."""

    weight: torch.Tensor  # (V, H), the lm_head's (the input embedding when tied)
    bias: torch.Tensor | None  # (V,): Phi
    logit_scale: float = 1.0  # Cohere, Granite
    softcap: float | None = None  # Gemma 2 / 3


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) of an architecture's config; ValueError naming the field for an
    output transform we do not reproduce."""
    config = _text_config(config)
    kind = config.model_type
    scale, softcap = 1.0, None
    for name in OUTPUT_FIELDS:
        value = getattr(config, name, None)
        if value is None or isinstance(value, bool):
            continue
        if name == "final_logit_softcapping":
            softcap = float(value)
        elif name == "logit_scale" and kind.startswith("cohere"):
            scale *= float(value)
        elif name == "logits_scaling" and kind.startswith("granite"):
            scale /= float(value)
        elif name == "logits_scaling" and kind == "hyperclovax":
            scale *= float(value)
        elif float(value) != 1.0:
            raise ValueError(f"config.json: {name}={value} ({kind}) changes the output logits in a way "
                             "fastrlhf does not reproduce; training on it would use wrong log-probs")
    return scale, softcap


def output_head(model) -> OutputHead:
    """The output layer of an HF causal LM as linear_logprob takes it (of an adapted model: the
    trained copy, or the base's own while its adapters are off)."""
    lm = lora.active(model.get_output_embeddings())
    if not isinstance(lm, nn.Linear):
        raise ValueError(f"{type(model).__name__}: the output layer is a {type(lm).__name__}, not a "
                         "Linear layer; fastrlhf's fused log-probs need a Linear lm_head")
    scale, softcap = output_transform(model.config)
    return OutputHead(lm.weight, lm.bias, scale, softcap)


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs matmuls in when it is on for t's device, else t's own."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


# ----------------------------------------------------------------------------------------
# FSDP2: a trained model sharded over the ranks (torchrun)
# ----------------------------------------------------------------------------------------


def decoder_layers(model) -> nn.ModuleList:
    """The transformer blocks of a causal LM or a sequence-classification model."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (looked for layers, h, blocks)")


def shard(model, dtype: torch.dtype, offload: bool = False):
    """FSDP2 (torch.distributed.fsdp.fully_shard) over the default group's ranks: each decoder
    layer its own unit, then the root (embeddings, final norm, output layer or value head in one
    unit, so a tied output layer stays its embedding). The float32 master weights, their
    gradients and AdamW's state are sharded; on CUDA in bfloat16 / float16 the layers compute in
    that dtype (MixedPrecisionPolicy, gradients reduced in float32). offload: the shards live in
    host memory (CPUOffloadPolicy, pinned on CUDA), each unit copied to the device for its pass."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = next(model.parameters()).device
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) \
        if device.type == "cuda" and dtype != torch.float32 else MixedPrecisionPolicy()
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, offload_policy=policy)
    fully_shard(model, mp_policy=mp, offload_policy=policy)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _whole_weights(fn):
    """Under FSDP2 a parameter is whole only inside the forward of the module that owns it: its
    pre-forward hook all-gathers it and its post-backward hook reduces its gradient (a kernel
    called on the output layer's weight from outside raises on the sharded DTensor, or on a bare
    full_tensor() keeps each rank's own gradient: silently wrong). So on a sharded model fn runs
    as the model's own forward (an instance attribute shadowing the class's for that call).
    A LoRA reference (lora.AdaptersOff) runs as its model with the adapters off."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        if isinstance(model, lora.AdaptersOff):
            with model.off() as base:
                return run(base, *args, **kwargs)
        if not is_sharded(model):
            return fn(model, *args, **kwargs)
        model.forward = lambda *a, **k: fn(model, *a, **k)
        try:
            return model(*args, **kwargs)
        finally:
            del model.forward
    return run


def full_state_dict(model) -> dict | None:
    """The whole model's state dict on the host: the model's own, or on a sharded model gathered
    from every rank (a collective: call it on all of them) and given to the main process (None
    elsewhere)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fastrlhf import dist

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main() else None


@_whole_weights
def token_logprobs(model, batch: dict, *, temperature=1.0, return_entropy=False, impl=None):
    """log p(labels[t] | tokens <= t) for every position (0 where labels == -100), float32,
    through linear_logprob on the last hidden state with the architecture's output transform
    (bias, logit scale, softcapping): the logits are never materialised. Under autocast the
    hidden state and the output weight enter the kernel in the autocast dtype (the gradient
    reaches the fp32 master weight through the cast)."""
    h = hidden_states(model, batch)  # (B, T, H)
    head = output_head(model)
    dtype = autocast_dtype(head.weight)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return linear_logprob(cast(h), cast(head.weight), batch["labels"].to(h.device), bias=cast(head.bias),
                          logit_scale=head.logit_scale, softcap=head.softcap, temperature=temperature,
                          return_entropy=return_entropy, impl=impl)


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


@_whole_weights
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


def freeze(model, dtype: torch.dtype) -> nn.Module:
    """A model that only scores (the reference, a reward model): eval mode (no dropout), no
    gradients; under torchrun sharded like a trained one (shard), so each rank holds 1/N of it
    and gathers a layer at a time in its forwards (every caller runs as many forwards on every
    rank: batch.micro_batches, data.pack_for_rank, score_with_model)."""
    from fastrlhf import dist

    model = model.eval().requires_grad_(False)
    if dist.world_size() > 1:
        shard(model, dtype)
    return model


def load_reward_model(path: str | Path, *, device="cpu", dtype=torch.float32):
    """A trained reward model, frozen (freeze), whichever its head (see sequence_rewards)."""
    load = load_causal_lm if reward_head(path) == "logprob" else load_value_model
    return freeze(load(path, device=device, dtype=dtype), dtype)


def load_frozen(path: str | Path, *, device, dtype) -> nn.Module:
    """A frozen causal LM (the reference) in the compute dtype (freeze)."""
    return freeze(load_causal_lm(path, device=device, dtype=dtype, verify=False), dtype)


def reference(policy, path: str | Path, *, device, dtype):
    """The frozen reference of a trained policy: with LoRA the policy itself with its adapters
    off (no second copy of the base), else the model at path, loaded frozen (load_frozen)."""
    if lora.is_adapted(policy):
        return lora.AdaptersOff(policy)
    return load_frozen(path, device=device, dtype=dtype)


def start_dir(path: str, out_dir: Path) -> str:
    """The HF directory a run starts from, for --model `path`: path itself, or for a PEFT adapter
    directory its base with the adapter merged in, written (by the main process) to
    out_dir/base: what the policy, the reference and the rollout engine load."""
    from fastrlhf import dist

    path = hub.resolve(path)  # a GGUF file (or a known name): its cached HF directory
    if not lora.is_adapter_dir(path):
        return path

    def merge() -> str:
        return str(save_pretrained_atomic(load_causal_lm(path, verify=False), load_tokenizer(path), out_dir / "base"))
    return dist.on_main(merge)


def engine_weights(model):
    """(name, tensor) pairs of the policy's current weights for the rollout engine, under the HF
    checkpoint's names, one parameter at a time (each gathered whole on a sharded model; LoRA:
    each adapted weight merged, lora.merged_weights)."""
    if lora.is_adapted(model):
        return lora.merged_weights(model)
    from fastrlhf import dist

    return ((n, dist.whole(p.detach())) for n, p in model.named_parameters())


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


def save_trained(model, tokenizer, out_dir: Path, state: dict | None = None) -> None:
    """What a checkpoint holds of a trained model: its HF directory (save_hf_dir), or with LoRA
    the PEFT adapter alone (+ the tokenizer), which load_trained(..., ckpt=) resumes from."""
    if lora.is_adapted(model):
        lora.save_adapter(model, out_dir, tokenizer, state)
    else:
        save_hf_dir(model, tokenizer, out_dir, state=state)


def save_hf_dir(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
                state: dict | None = None) -> None:
    """config + safetensors + tokenizer into out_dir (not atomic: see save_pretrained_atomic);
    the weights cast to `dtype` when given (the trained float32 masters saved as bf16, say),
    tied weights kept tied. state: the whole state dict of a sharded model (full_state_dict).
    An adapted (LoRA) model: the merged model (lora.merged_weights), and the PEFT adapter in
    out_dir/adapter."""
    import json

    if lora.is_adapted(model):
        lora.save_adapter(model, Path(out_dir) / "adapter", tokenizer, state)
        state = dict(lora.merged_weights(model, state))
        model = model.get_base_model()
    old = model.config.dtype
    if state is not None:
        state = dict(state)  # save_pretrained edits the dict it is given
    if dtype is not None and any(t.dtype != dtype for t in (model.parameters() if state is None else state.values())):
        cast: dict = {}
        state = {k: cast.setdefault(v.data_ptr(), v.to(dtype)) if v.is_floating_point() else v
                 for k, v in (model.state_dict() if state is None else state).items()}
    try:
        model.save_pretrained(out_dir, safe_serialization=True, state_dict=state)
    finally:
        model.config.dtype = old  # save_pretrained writes the parameters' dtype into the config
    if state is not None:  # ... which is the float32 masters': say what the file holds
        path = Path(out_dir) / "config.json"
        config = json.loads(path.read_text())
        saved = dtype or next(v.dtype for v in state.values() if v.is_floating_point())
        config["dtype"] = str(saved).removeprefix("torch.")
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir)


def save_pretrained_atomic(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
                           state: dict | None = None) -> Path:
    """An HF directory written to a sibling temp dir and renamed into place: a crash mid-write
    never leaves a half-written model under out_dir."""
    with atomic_dir(out_dir) as tmp:
        save_hf_dir(model, tokenizer, tmp, dtype, state)
    return Path(out_dir)
