"""The files of a run folder, named once: what ``skinclf train`` writes there (README.md, "What a
run leaves behind") and what ``report``, ``predict``, ``explain`` and the sweep tools read back.

A sweep job's own bookkeeping files (``run_config.json``, ``job_status.json``) are named in
:mod:`skinclf.sweep.jobs`.
"""

from __future__ import annotations

from pathlib import Path

# Hydra's record of the run: its composed config and its command-line overrides.
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = Path(HYDRA_DIR) / "config.yaml"
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"
HYDRA_SETTINGS = Path(HYDRA_DIR) / "hydra.yaml"
# In a sweep folder, beside the job folders: the sweep's own config.
HYDRA_MULTIRUN = "multirun.yaml"
TRAIN_LOG = "train.log"
METRICS = "metrics.csv"  # one row per epoch
BEST_CHECKPOINT = "best.pt"  # the model (and optimizer) of the best epoch by validation accuracy
LAST_CHECKPOINT = "last.pt"  # everything a resume needs, rewritten every trainer.checkpoint_every epochs
PREDICTIONS = "predictions.csv"
# The run's validation and test curves, its operating point marked.
ROC_FIGURE = "roc.png"
PR_FIGURE = "pr.png"
# Written last: a folder without it is an unfinished (or crashed) run.
TEST_METRICS = "test_metrics.json"
# A cross-validation job (cv.folds > 0, the grid search) writes these instead of the test files:
# each fold's result in its fold_K/ folder, then the mean over the folds, last.
FOLD_RESULT = "fold_result.json"
CV_RESULT = "cv_result.json"
# Beside them, written before the first fold: which images each fold validates on (a digest), so
# that a resume never mixes folds drawn two ways.
FOLDS_RECORD = "folds.json"
# In a grid search's sweep folder, at the end of the sweep: its points ranked by CV_RESULT.
GRID_CSV = "grid_search.csv"
GRID_MD = "grid_search.md"
