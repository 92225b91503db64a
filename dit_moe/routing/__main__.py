"""`python -m dit_moe.routing COMMAND ...`: see dit_moe.routing.cli."""

import sys

from .cli import main

sys.exit(main())
