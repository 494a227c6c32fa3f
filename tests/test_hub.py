"""fastrlhf.hub's cache of converted GGUF files, without the real model (its conversion is tested
on SmolLM2 in tests/trainer/test_smollm2.py)."""

import json
import multiprocessing
import time

from fastrlhf import files, hub


def _resolve_slowly(path, log):
    """hub.resolve in a forked process, its conversion stood in by one that takes 0.5 s and says so."""
    def convert(gguf, out):
        with open(log, "a") as f:
            f.write("converting\n")
        time.sleep(0.5)
        with files.atomic_dir(out) as tmp:
            (tmp / "config.json").write_text(json.dumps({"from": str(gguf)}))
        return out

    hub.convert = convert
    print(hub.resolve(path), file=open(f"{log}.{multiprocessing.current_process().name}", "w"))


def test_two_processes_resolving_one_gguf_at_once_convert_it_once(tmp_path, monkeypatch):
    """Two processes (two runs, two test workers) asking for the same GGUF at the same moment: one
    converts, the other waits on the entry's lock and gets the same directory; nothing is half
    written (before the lock both converted into the same temp directory, each deleting the other's)."""
    monkeypatch.setenv("FASTRLHF_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    log = tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_resolve_slowly, args=(gguf, log), name=f"p{i}") for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert log.read_text() == "converting\n"
    dirs = {(tmp_path / f"log.p{i}").read_text().strip() for i in range(2)}
    assert dirs == {str(hub.cached_dir(gguf))}
    assert json.loads((hub.cached_dir(gguf) / "config.json").read_text()) == {"from": str(gguf)}
    assert hub.resolve(gguf) == str(hub.cached_dir(gguf))  # made: no conversion, no lock needed
