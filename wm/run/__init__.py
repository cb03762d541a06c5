"""The run machinery every command shares: `python -m wm fit|test|predict` (cli), the LightningCLI
of a run folder with its MLflow run and resume checks (command), what names a run and what may
change on a resume (identity), start-up validation, MLflow tracking, atomic files, the run lock,
threads and memory. May import everything below it (wm.agent, wm.envs, datamodules, callbacks);
callbacks and datamodules import only its leaf modules (files, identity, tracking, durations,
video), which import nothing above wm.agent."""
