"""`python -m fastrlhf ...` (what torchrun launches: `torchrun --nproc_per_node N -m fastrlhf sft ...`)."""

import os
import sys

from fastrlhf import dist
from fastrlhf.cli import main

code = main()
if dist.launched():
    # one of several processes: every rank has passed the closing barrier (dist.teardown) and
    # written what it writes; leave without running the C++ destructors of the process group,
    # which abort a rank now and then ("terminate called without an active exception", about
    # 1 in 30 two-rank gloo runs) after a run that succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
