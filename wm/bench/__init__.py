"""Speed and memory of a training update: `python -m wm.bench update --size size12M --objective barlow`.
A tool: it may import everything of wm, datamodules and callbacks.

Runs real updates of the Lightning agent through a Trainer on a random replay batch and prints
the median seconds per update after warm-up, the share of each phase (eager only), the peak
memory, and what decides speed on any hardware: compile time and graph breaks (`--compile`),
host syncs and aten ops in one update (torch.profiler), GFLOP per update (FlopCounterMode) and
the fraction of this machine's peak matmul throughput that the update achieves.
`python -m wm.bench params --size size12M` prints the per-module parameter table.
`python -m wm.bench replay --rows 100000 --new-rows 12500` prints the bytes and seconds of the
first replay save of a buffer holding `rows` rows and of the next save, after `new_rows` more.
`python -m wm.bench fit --config configs/dmc.yaml --seconds 120` runs a real fit and prints env
frames/s, updates/s and the share of wall time in each part of the loop (wm/bench/fit.py).

This package imports nothing heavy: env worker processes import the main module, which for
`python -m wm.bench` is wm/bench/__main__.py, under its package.
"""
