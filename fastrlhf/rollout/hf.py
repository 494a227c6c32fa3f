"""transformers `generate` on the policy itself: the fallback when vLLM is not installed.

Nothing to push (it samples from the very module being trained), nothing to put to sleep.
Prompts are left-padded into one batch per call; the sampler's log-probs are the log-softmax of
the processed scores (after temperature), as vLLM's "processed_logprobs".
"""

from __future__ import annotations

import torch

from fastrlhf.rollout.base import Sample


class HFEngine:
    name = "hf"

    def __init__(self, policy, tokenizer, max_batch: int = 256):
        self.policy, self.tokenizer, self.max_batch = policy, tokenizer, max_batch

    def sleep(self) -> None:
        pass  # it generates with the live policy: nothing to release

    def wake_up(self, tags=None) -> None:
        pass

    def update_weights(self, named_tensors) -> None:
        pass  # generate() runs on the live policy

    def close(self) -> None:
        pass  # it owns nothing but a reference to the policy

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                 seed: int, top_p: float = 1.0, indices: list[int] | None = None) -> list[list[Sample]]:
        model, tok = self.policy, self.tokenizer
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        torch.manual_seed(seed)
        groups: list[list[Sample]] = []
        per_call = max(1, self.max_batch // n)
        for start in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[start:start + per_call]
            T = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, p in enumerate(chunk):  # left padding: generation continues every row at T
                ids[b, T - len(p):], attn[b, T - len(p):] = torch.tensor(p), 1
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) \
                if temperature > 0 else dict(do_sample=False)
            out = model.generate(ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_tokens,
                                 num_return_sequences=n, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
            new = out.sequences[:, T:]  # (len(chunk) * n, L)
            logp = torch.stack(out.scores, 1).float().log_softmax(-1)  # (len(chunk) * n, L, V)
            tok_lp = logp.gather(-1, new[..., None]).squeeze(-1).tolist()
            for b, p in enumerate(chunk):
                group = []
                for j in range(b * n, (b + 1) * n):
                    row = new[j].tolist()
                    stop = tok.eos_token_id in row
                    L = row.index(tok.eos_token_id) + 1 if stop else len(row)
                    group.append(Sample(start + b, list(p), row[:L], tok_lp[j][:L],
                                        "stop" if stop else "length"))
                groups.append(group)
        model.train(was_training)
        return groups
