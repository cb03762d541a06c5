"""`python -m wm fit --config configs/dmc.yaml`: see wm/run/cli.py.

Nothing heavy is imported unless this runs as the program: env worker processes import the main
module (as `__mp_main__`), and must not load torch and Lightning for it.
"""

import sys

if __name__ == "__main__":
    from wm.run.cli import REFUSALS, main

    try:
        main()
    except REFUSALS as refusal:  # the message says what is wrong and how to fix it; no traceback
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(2)
