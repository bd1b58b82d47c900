"""The files of a run folder, named once: what ``skinclf train`` writes there (README.md, "What a
run leaves behind") and what ``report``, ``predict``, ``explain`` and the sweep tools read back;
and a sweep folder's own. Which of them decide what (a run's bookkeeping, its outputs) is
:mod:`skinclf.run_folder`'s to say.
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
# The config a run folder was claimed for (a re-launch or resume=true must match it), and the
# run's state: running (its process and machine), done, skipped, failed, stopped. Every run
# writes both, a single run as a sweep job.
RUN_CONFIG = "run_config.json"
STATUS_FILE = "job_status.json"
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
# In a sweep folder: the outcome of its last launch's jobs; the launch's tag, which tells this
# launch's job records from an earlier one's; beside a job folder, the status of a job refused
# before it ran (.refused_<job folder>.json).
SWEEP_SUMMARY = "sweep_summary.json"
LAUNCH_FILE = ".skinclf_launch"
REFUSED_PREFIX = ".refused_"
