"""Random-weight models of real architectures with a real subword tokenizer, built offline.

What users bring is not our toy Llama with a character tokenizer: it is a Qwen, Gemma, Phi or
GPT-2 checkpoint with a byte-level BPE tokenizer and a chat template. Their architectures
differ exactly where a trainer can go silently wrong: an output bias (Phi), final-logit and
attention-logit softcapping and sliding windows (Gemma 2), logit scales (Cohere, Granite), tied
embeddings (Qwen2 small, Gemma 2, GPT-2), dropout in the config (GPT-2), q/k norms (Qwen3),
fused projections (Phi-3). Each builder here makes a tiny (hidden 128, 2 layers, head_dim 64,
so vLLM's CPU backend can serve it) random-weight model of one of them from its transformers
config, with the same locally trained byte-level BPE tokenizer and a ChatML chat template.

    build_tokenizer()              -> PreTrainedTokenizerFast (BPE, ChatML template, eos <|im_end|>)
    save_arch(name, out_dir)       -> an HF directory (config + safetensors + tokenizer)
    ARCHS                          the names, e.g. "qwen2", "gemma2", "phi", "gpt2"
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = ("the a an of to in is it that for on with as was by this be are from at or have not "
          "answer question add sum number plus equals what how many apples left right one two three "
          "four five six seven eight nine ten hello world please tell me about model train reward "
          "good bad better worse assistant user system response think step first then finally "
          "because so yes no maybe color red blue green sky sea day night time year people").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A few hundred lines of English-like text, sums and chat turns to train the BPE on."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(words.capitalize() + rng.choice([".", "?", "!"]))
        lines.append(f"What is {a}+{b}? {a}+{b}={a + b}")
        if i % 4 == 0:
            lines.append(f"<|im_start|>user\n{words}<|im_end|>\n<|im_start|>assistant\n{a + b}<|im_end|>")
    return lines


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(*, pad: bool = True, vocab_size: int = 512):
    """A byte-level BPE trained here on `corpus()`, with a ChatML chat template; eos is <|im_end|>
    (as Qwen's instruct models), pad <|endoftext|> (pad=False: none, as Llama 3 / Mistral ship)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    extra = {"pad_token": "<|endoftext|>"} if pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
                                  eos_token="<|im_end|>", **extra)
    tok.chat_template = CHATML
    return tok


def _common(tok) -> dict:
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>")}
    if tok.pad_token_id is not None:
        ids["pad_token_id"] = tok.pad_token_id
    return dict(vocab_size=len(tok), max_position_embeddings=256, **ids)


def _llama(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, tie_word_embeddings=False, **_common(tok), **kw)


def _qwen2(tok, tied: bool, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, tie_word_embeddings=tied, **_common(tok), **kw)


def _qwen3(tok, **kw):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, tie_word_embeddings=False, **_common(tok), **kw)


def _mistral(tok, **kw):
    from transformers import MistralConfig

    return MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, tie_word_embeddings=False,
                         **{"sliding_window": 4096, **_common(tok), **kw})


def _gemma2(tok, **kw):
    from transformers import Gemma2Config

    # caps small enough to bind on a random-init model (Gemma 2 ships 30 / 50): a trainer
    # that ignores them is visibly wrong
    return Gemma2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                        **{"final_logit_softcapping": 2.0, "attn_logit_softcapping": 1.0,
                           "sliding_window": 4096, **_common(tok), **kw})


def _phi3(tok, **kw):
    from transformers import Phi3Config

    return Phi3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False,
                      **{"sliding_window": None, **_common(tok), **kw})


def _phi(tok, **kw):
    from transformers import PhiConfig

    return PhiConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, partial_rotary_factor=0.5, **_common(tok), **kw)


def _gpt2(tok, **kw):
    from transformers import GPT2Config

    c = _common(tok)
    return GPT2Config(vocab_size=c["vocab_size"], n_positions=256, n_embd=128, n_layer=2, n_head=2,
                      bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"],
                      **kw)  # dropout 0.1 everywhere, as GPT-2 ships


def _cohere(tok, **kw):
    from transformers import CohereConfig

    return CohereConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, **{"logit_scale": 0.25, **_common(tok), **kw})


def _granite(tok, **kw):
    from transformers import GraniteConfig

    return GraniteConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=False,
                         **{"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                            "attention_multiplier": 0.1, **_common(tok), **kw})


BUILDERS = {
    "llama": _llama,
    "qwen2": functools.partial(_qwen2, tied=False),
    "qwen2-tied": functools.partial(_qwen2, tied=True),
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "phi": _phi,
    "gpt2": _gpt2,
    "cohere": _cohere,
    "granite": _granite,
}
ARCHS = tuple(BUILDERS)


def build_model(name: str, *, seed: int = 0, tokenizer=None, init_std: float = 0.1, **config_overrides):
    """A random-weight AutoModelForCausalLM of architecture `name`. init_std (larger than the
    configs' 0.02) spreads the logits so that output transforms and attention softcaps bind."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizer or build_tokenizer()
    config = BUILDERS[name](tok, **config_overrides)
    if hasattr(config, "initializer_range"):
        config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases and norms start at 0 / 1: give them random values too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * init_std)
    return model


def save_arch(name: str, out_dir, *, seed: int = 0, pad: bool = True, **config_overrides) -> Path:
    """An HF directory (config, safetensors, tokenizer) of a random-weight `name` model."""
    from fastrlhf.models import save_pretrained_atomic

    tok = build_tokenizer(pad=pad)
    return save_pretrained_atomic(build_model(name, seed=seed, tokenizer=tok, **config_overrides), tok, out_dir)
