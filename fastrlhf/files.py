"""Files written so that a crash never leaves half of one: a text file replaced atomically,
a directory filled beside its final place and renamed into it; a full disk is named as such."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a sibling temp directory to fill; on success it replaces `final` (the old one is
    kept as final.old until the new one is in place). A crash leaves `final` untouched and only
    `final.tmp` behind, which the next write clears."""
    final = Path(final)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        if _disk_full(e, final.parent):
            free = shutil.disk_usage(final.parent).free
            raise OSError(errno.ENOSPC, f"no space left on device writing {final} ({free / 2**20:.0f} MiB free "
                                        f"on {final.parent}); the previous copy, if any, is untouched") from e
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _disk_full(e: BaseException, where: Path) -> bool:
    """An error that is the disk being full, whatever the writer said (torch.save reports
    'unexpected pos 683264 vs 683152', safetensors an I/O error)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if isinstance(e, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(where).free < 16 * 2**20
        except OSError:
            return False
    return False
