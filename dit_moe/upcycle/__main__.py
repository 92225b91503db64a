"""`python -m dit_moe.upcycle`: the command line of upcycle.py."""

import sys

from .tool import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dit_moe.upcycle"))
