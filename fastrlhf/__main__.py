"""`python -m fastrlhf ...` (what torchrun launches: `torchrun --nproc_per_node N -m fastrlhf sft ...`)."""

import sys

from fastrlhf.cli import main

sys.exit(main())
