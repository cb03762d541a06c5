"""`python -m wm fit --config configs/dmc.yaml`: see wm/cli.py."""

import sys

from wm.cli import REFUSALS, main

if __name__ == "__main__":
    try:
        main()
    except REFUSALS as refusal:  # the message says what is wrong and how to fix it; no traceback
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(2)
