"""`python -m wm fit --config configs/dmc.yaml`: see wm/cli.py."""

from wm.cli import main

if __name__ == "__main__":
    main()
