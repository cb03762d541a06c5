"""`python -m wm.probe collect|train|eval|study`: representation probes (see wm/probe/__init__.py).

    python -m wm.probe collect --task dmc-cartpole_swingup --frames 20000 --out data/probe/dmc-cartpole_swingup
    python -m wm.probe train --config configs/probe/train.yaml --config configs/objective/barlow.yaml \\
        --data.dataset data/probe/dmc-cartpole_swingup
    python -m wm.probe eval --ckpt runs/probe/<run>/checkpoints/last.ckpt --data data/probe/dmc-cartpole_swingup
    python -m wm.probe eval --anchor true --data data/probe/dmc-cartpole_swingup
    python -m wm.probe study --config configs/probe/dmc.yaml
"""

from __future__ import annotations

import sys

COMMANDS = ("collect", "train", "eval", "study")


def main(argv: list[str]) -> int:
    """Imports the commands only when called: worker processes (collect's) import this module as
    their main module, and need none of it."""
    from wm.run.machine import retain_freed_memory
    from wm.probe.commands import collect_main, eval_main
    from wm.probe.study import study_main
    from wm.probe.offline import main as train_main
    from wm.run.command import REFUSALS

    usage = f"usage: python -m wm.probe {{{','.join(COMMANDS)}}} ...\n{__doc__}"
    if argv[:1] in (["-h"], ["--help"]):  # asked for: the usage on stdout, success
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    retain_freed_memory()
    try:
        dict(zip(COMMANDS, (collect_main, train_main, eval_main, study_main)))[argv[0]](argv[1:])
    except (*REFUSALS, FileNotFoundError) as refusal:  # the message says what is wrong and how to fix it
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
