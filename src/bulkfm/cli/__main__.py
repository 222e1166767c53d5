"""``python -m bulkfm.cli`` (what ``torchrun -m bulkfm.cli pretrain ...`` runs)."""

import sys

from bulkfm.cli import main

sys.exit(main())
