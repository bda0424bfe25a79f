"""`python -m bloodcells_dist.train` and `accelerate launch -m bloodcells_dist.train`: the trainer."""

import sys

from ..cli import run_main
from .trainer import main

sys.exit(run_main(main))
