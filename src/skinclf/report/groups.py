"""Which finished runs are repetitions of one experiment, and the order the paper lists them in.

Runs are grouped per dataset (never averaged across datasets), then per model and *variant*: the
experiment settings (command-line overrides by the values they resolved to, see
``runs.NOT_AN_EXPERIMENT_SETTING``) that differ between the runs of that dataset. Runs that differ
only in seed form one group (mean ± std, n; a seed counts once: a second run of the same seed is
left out, its ``problem`` says so); ``optim.lr=0.001`` vs the default is a different row,
not another seed, while ``optim.lr=1e-3`` is the same row as ``optim.lr=0.001``. Settings shared by every
run of a dataset are not repeated in each row but reported once (``common_settings``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from skinclf.models import model_order
from skinclf.report.runs import (
    NOT_AN_EXPERIMENT_SETTING,
    Run,
    as_override,
    is_group,
    keys_set_by,
    leaves_of,
    told_apart_by_digest,
)


@dataclass
class Group:
    """The finished runs of one model (and variant) on one dataset."""

    data: str
    model: str
    variant: str = ""
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Row name in tables and legends: the model, plus its differing settings if any."""
        return f"{self.model} [{self.variant}]" if self.variant else self.model


def common_settings(runs: Iterable[Run]) -> dict[str, str]:
    """Settings that every one of ``runs`` was started with, with the same value."""
    runs = list(runs)
    if not runs:
        return {}
    shared = dict(runs[0].settings)
    for run in runs[1:]:
        shared = {k: v for k, v in shared.items() if run.settings.get(k) == v}
    return shared


# The config keys of NOT_AN_EXPERIMENT_SETTING (not its group names, model and data, whose keys
# are settings).
NO_EXPERIMENT_KEYS = NOT_AN_EXPERIMENT_SETTING - {"model", "data"}
# The problem of a finished run left out of Table 1 (runs.csv says which, and why).
NOT_COUNTED = "not counted: "


# The setting that tells apart runs of one experiment trained on other images (see below); one
# word, as runs.csv separates settings by spaces.
TRAINING_DATA = "training_data"


def add_training_data_differences(runs: list[Run]) -> None:
    """Add ``training_data=<digest>`` to the settings of ``runs`` (of one model on one dataset)
    whose settings are alike but whose training images or labels differ, as their test_metrics.json
    records them (images added to a folder's train/ between two seeds): they learned from other
    data, and would otherwise be averaged as seeds of one experiment. Where runs are told apart so,
    those that record no digest (an older skinclf's) are ``training_data=unknown``; elsewhere they
    are left as they are. A data.balance_train run records the split its seeded subset is drawn
    from, so that its seeds stay one experiment."""
    for run, digest in told_apart_by_digest(runs, "train_data_sha256", _settings_of):
        run.settings[TRAINING_DATA] = digest


def _settings_of(run: Run) -> tuple:
    return tuple(sorted(run.settings.items()))


def add_config_differences(runs: list[Run]) -> None:
    """Add to the settings of ``runs`` (of one model on one dataset) the config values that differ
    between them though no setting says why: a model YAML edited between two runs, or two model
    configs of one name. Their overrides alike, they would otherwise be averaged as seeds of one
    experiment. Compared as written (``data.seed: ${seed}`` is one value) and, where that differs,
    as resolved (``freeze: ${..freeze}`` and ``none``, ``0`` and ``0.0`` are one value); on the
    keys every run's config has (an older skinclf's lacks those added since); leaving out the keys
    that make no other experiment (NOT_AN_EXPERIMENT_SETTING) and those a setting explains, a
    group choice's included (recipe=modern sets optim.lr)."""
    compared = [run for run in runs if run.config is not None]
    if len(compared) < 2:
        return
    written = [dict(leaves_of(run.config)) for run in compared]
    resolved = [None if run.resolved is None else dict(leaves_of(run.resolved)) for run in compared]
    common = set.intersection(*(set(values) for values in written))
    explained = {_package(key) for run in runs for key in run.settings}
    for run in runs:
        for key, value in run.settings.items():
            if is_group(key):
                explained |= keys_set_by(f"{key}={value}")
    for key in sorted(common):
        if len({repr(values[key]) for values in written}) == 1:
            continue
        if _under(key, NO_EXPERIMENT_KEYS) or _under(key, explained):
            continue
        shown = [
            as_override((values if values is not None and key in values else raw)[key])
            for values, raw in zip(resolved, written, strict=True)
        ]
        if len(set(shown)) == 1:  # one value, written two ways
            continue
        for run, value in zip(compared, shown, strict=True):
            run.settings[key] = value


def _package(key: str) -> str:
    """Where a setting's key puts its values: ``pipeline@model.pipeline`` -> ``model.pipeline``."""
    return key.split("@", 1)[1] if "@" in key else key


def _under(key: str, prefixes: Iterable[str]) -> bool:
    """Whether dotted ``key`` is one of ``prefixes`` or inside one."""
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def group_runs(runs: Iterable[Run]) -> dict[str, list[Group]]:
    """Finished runs grouped per dataset (sorted by name), each dataset's groups in paper order."""
    by_data: dict[str, list[Run]] = {}
    for run in runs:
        by_data.setdefault(run.data, []).append(run)
    for data_runs in by_data.values():
        by_model: dict[str, list[Run]] = {}
        for run in data_runs:
            by_model.setdefault(run.model, []).append(run)
        for model_runs in by_model.values():
            add_config_differences(model_runs)
            add_training_data_differences(model_runs)
    result = {}
    for data in sorted(by_data):
        shared = common_settings(by_data[data])
        groups: dict[tuple[str, str], Group] = {}
        for run in by_data[data]:
            variant = " ".join(f"{k}={v}" for k, v in sorted(run.settings.items()) if k not in shared)
            group = groups.setdefault((run.model, variant), Group(data, run.model, variant))
            twin = next((r for r in group.runs if run.seed is not None and r.seed == run.seed), None)
            if twin is not None:
                # The same experiment and seed again (another folder, another device): counting it
                # would add a run that is no independent repetition, raising n and shrinking std.
                run.problem = f"{NOT_COUNTED}repeats seed {run.seed} of {twin.path}"
                continue
            group.runs.append(run)
        result[data] = sorted(groups.values(), key=lambda g: (model_order(g.model), g.variant))
    return result
