"""The tasks a run can train on, and the choice between them (the composition root's: the CLI
and the demo call for_config; the trainers only see the fastrlhf.task.Task they are given)."""

from __future__ import annotations

from fastrlhf.task import FileData, Task


def for_config(cfg) -> Task:
    """The built-in arithmetic task, with the user's files (cfg.data / cfg.eval_data) in front of
    it for what they give."""
    from fastrlhf.tasks.arithmetic import Arithmetic

    builtin = Arithmetic(cfg)
    return FileData(cfg, builtin) if cfg.data or cfg.eval_data else builtin
