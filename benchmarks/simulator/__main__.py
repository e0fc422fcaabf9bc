"""``python -m benchmarks.simulator``: the scheduler simulator's CLI (``scheduler_sim``)."""

import sys

from benchmarks.simulator.scheduler_sim import main

sys.exit(main())
