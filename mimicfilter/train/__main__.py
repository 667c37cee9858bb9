"""``python -m mimicfilter.train``: open_clip's trainer with Grad-Mimic re-weighting (docs/training.md)."""

import sys

from mimicfilter.train.open_clip_trainer import main

sys.exit(main())
