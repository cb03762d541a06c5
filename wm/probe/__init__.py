"""Representation probes: what each objective's latent state holds about the true state.

RL returns at CPU scale are too noisy to separate the objectives; a linear probe of the simulator's
state from the latent, and the probe applied to imagined states, measure the representation itself:

- `wm.probe.dataset`: collect episodes with their true state once (`python -m wm.probe collect`);
- `wm.probe.offline`: train only a world model of any objective on them (`python -m wm.probe train`);
- `wm.probe.ridge`: closed-form ridge regression, its penalty chosen by cross-validation;
- `wm.probe.evaluate`: probe any world-model or agent checkpoint, observed and imagined
  (`python -m wm.probe eval`), with the sanity anchors (the true state, an untrained model, noise).
- `wm.probe.study`: a whole study group from one config (`python -m wm.probe study`): datasets,
  training runs, their probes and the anchors in one MLflow experiment, the config checked first.

A tool: it may import everything of wm, datamodules and callbacks.
"""
