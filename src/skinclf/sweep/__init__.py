"""Sweeps: many runs from one command.

- ``resources``: CPU threads and GPU per parallel job, so jobs do not fight over the hardware.
- ``jobs``: one sweep job's life: skip if finished, resume if not, record failure instead of aborting.
- ``cross_validation``: stratified k-fold CV on the training split (the grid search's inner loop).
- ``summary``: the Hydra callback that reports a finished sweep, and records which folders a
  launch (a single run too) made, for ``train_command`` to remove when it never started.
- ``grid``: the grid search's points ranked by cross-validated accuracy (grid_search.md).
- ``launcher``: the ``local`` launcher, one process per job (src/hydra_plugins/skinclf_launcher).
- ``cluster``: the ``slurm`` and ``slurm_local`` launchers: a killed job fails alone.
"""
