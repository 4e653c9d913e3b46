"""``python -m gacd_fast``: the gacd-fast command line (see gacd_fast.cli)."""
import sys

from .cli import main

sys.exit(main())
