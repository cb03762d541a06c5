"""`python -m wm.bench update|params|replay|fit ...`: see wm/bench/__init__.py.

Nothing heavy is imported unless this runs as the program: env worker processes import the main
module (as `__mp_main__`), and must not load torch and Lightning for it.
"""

import sys

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["fit"]:  # a real fit: its own options, and any `--key value` of `python -m wm fit`
        from wm.bench.fit import main

        main(argv[1:])
    elif argv[:1] == ["check"]:  # the whole machine, each measurement in its own process
        from wm.bench.check import main

        main(argv[1:])
    else:
        from wm.bench.update import main

        main(argv)
