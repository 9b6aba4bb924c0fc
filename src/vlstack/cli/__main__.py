"""`python -m vlstack.cli` (torchrun and the TP launcher start processes this way)."""

import sys

from . import main

sys.exit(main())
