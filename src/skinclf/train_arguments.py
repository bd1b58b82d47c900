"""`skinclf train`'s command line, checked before Hydra composes anything: Hydra's options and
output folders, the launcher, config-group choices, sweep values, and every override's key and
value shape. Each mistake is one line naming the override (Hydra would answer with a traceback,
a run that ignores the value, or a sweep refused only after its first jobs ran).

Like :mod:`skinclf.train_command`, this module imports no torch: a mistyped override answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep, Override
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from skinclf.config import (
    adds_config_folders,
    composed_or_none,
    config_choices,
    grid_search_without_folds,
    holds_key,
    override_key,
)
from skinclf.errors import SkinclfError, first_line
from skinclf.sweep.resources import N_JOBS_ZERO


def checked_for_hydra(args: list[str]) -> list[str]:
    """``args`` checked (a SkinclfError names the first mistake) and as Hydra is to read them: in
    an order its parser takes (:func:`overrides_together`), and with ``++`` before the keys that
    only some of a sweep's choices have (:func:`check_override_keys`)."""
    args = overrides_together(args)
    _check_hydra_options(args)
    _check_output_folders(args)
    _check_launcher(args)
    _check_group_choices(args)
    _check_sweeps_are_launched_as_sweeps(args)
    _check_sweeps_have_values(args)
    _check_grid_search_folds(args)
    _check_deletions(args)
    forced = check_override_keys(args)
    return [f"++{arg}" if arg in forced else arg for arg in args]


def _check_deletions(args: list[str]) -> None:
    """``~key`` of a key that skinclf's configs set (``~model``, ``~trainer.patience``; with
    ``data=folder``, its keys): the run reads them, and failed on the missing key with a traceback
    or an error about a value nobody typed. Keys the configs lack are Hydra's to refuse."""
    deletions = [
        (arg, override.key_or_group) for arg, override, _ in _parsed_overrides(args) if override.is_delete()
    ]
    deletions = [(arg, key) for arg, key in deletions if not key.startswith(("hydra.", "hydra/"))]
    if not deletions or adds_config_folders(args):
        return  # with configs of the user's own, which keys there are is Hydra's to know
    # The configs as chosen on the command line (one value each; a sweep's choices are left out):
    # data=folder has no data.train_size to remove.
    chosen = tuple(
        arg
        for arg, override, values in _parsed_overrides(args)
        if not override.is_delete()
        and not override.package
        and config_choices(override.key_or_group)
        and values is not None
        and len(values) == 1
    )
    configs = composed_or_none(chosen)  # None: a choice Hydra will refuse itself
    for arg, key in deletions:
        if configs is not None and holds_key(configs, key):
            raise SkinclfError(
                f"{arg}: removes a key of skinclf's configs, which the run reads; set it instead "
                f"({key}=VALUE; `skinclf train --help` lists the keys and choices)"
            )


def _check_output_folders(args: list[str]) -> None:
    """A hydra.run.dir / hydra.sweep.dir given on the command line must be a folder that can be
    made: Hydra makes it before any skinclf code runs, and reports a failure with a traceback."""
    for arg in args:
        key, has_value, value = arg.partition("=")
        if not has_value or key.lstrip("+") not in {"hydra.run.dir", "hydra.sweep.dir"}:
            continue
        # Up to the first interpolation (out/${model.name}): the folders above it are fixed already.
        folder = Path(os.path.abspath(value.split("${", 1)[0] or "."))
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        existing = folder.parents[len(missing) - 1] if missing else folder
        if not existing.is_dir():
            raise SkinclfError(f"{arg}: {existing} is a file; expected a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise SkinclfError(f"{arg}: {existing} is not writable")
        if missing:
            # What access() cannot tell (a read-only or special file system such as /proc, root's
            # rights): whether a folder can be made there. A probe of a name of its own, so that
            # launches into the same new folder at once never meet it.
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".skinclf-probe-", dir=existing))
            except OSError as err:
                raise SkinclfError(f"{arg}: cannot make {missing[-1]} ({err.strerror})") from err


# The Slurm launchers (skinclf's config, and the plugin's own) submit each job with sbatch.
SLURM_LAUNCHERS = {"hydra/launcher=slurm", "hydra/launcher=submitit_slurm"}


def _check_launcher(args: list[str]) -> None:
    """A Slurm sweep where there is no Slurm, or n_jobs=0: one line, not submitit's or joblib's
    traceback after the sweep folder was made."""
    slurm = [arg for arg in args if arg.lstrip("+") in SLURM_LAUNCHERS]
    parsed = [(override.key_or_group, values) for _, override, values in _parsed_overrides(args)]
    # Under hydra/launcher=local skinclf's own check names it; under plain joblib, joblib raised
    # on it with a traceback.
    if any(key == "hydra.launcher.n_jobs" and 0 in (values or []) for key, values in parsed):
        raise SkinclfError(N_JOBS_ZERO)
    # A single run ignores the launcher.
    if slurm and _is_sweep(args) and shutil.which("sbatch") is None:
        raise SkinclfError(
            f"{slurm[0]}: no sbatch command on this machine; launch the sweep from a node of the Slurm "
            "cluster, or run it here with hydra/launcher=local or the default launcher"
        )


OVERRIDE_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


class _NotHydrasCommandLine(Exception):
    """Hydra's argument parser refuses the command line: Hydra then says why, itself."""


def _hydra_parser() -> argparse.ArgumentParser:
    """Hydra's own argument parser, raising _NotHydrasCommandLine where it would print and exit."""
    parser = get_args_parser()

    def refuse(*_: object, **__: object) -> NoReturn:
        raise _NotHydrasCommandLine

    parser.error = refuse  # type: ignore[method-assign]
    parser.exit = refuse  # type: ignore[method-assign]
    return parser


def asks_version(args: Sequence[str]) -> bool:
    """Whether ``args`` hold Hydra's --version (or an abbreviation of it, as argparse takes)."""
    return any(len(arg) > 2 and "--version".startswith(arg) for arg in args)


@functools.cache
def _hydra_arguments(args: tuple[str, ...]) -> argparse.Namespace | None:
    """The command line as Hydra's own argument parser reads it (its options, their values, their
    abbreviations such as --multi; the overrides); None where that parser would refuse it, or
    print and exit itself (--version), which is then left to Hydra. An option it does not know
    is a SkinclfError here (one line instead of Hydra's usage)."""
    if asks_version(args):
        return None
    parser = _hydra_parser()
    try:
        namespace, unknown = parser.parse_known_args(list(args))
    except _NotHydrasCommandLine:
        return None
    option = next((word for word in unknown if word.startswith("-")), None)
    if option is not None:  # Hydra prints its whole usage, then the word: one line instead
        raise SkinclfError(
            f"{option}: unknown option; expected Hydra's (-m/--multirun, --cfg, --config-dir, --help, "
            "... see `skinclf train --help`) and key=value overrides"
        )
    # Words after the overrides' run (`model=x -m seed=1`) are refused by Hydra's parse_args.
    return None if unknown else namespace


def _override_words(args: list[str]) -> list[str]:
    """The words of ``args`` that Hydra reads as overrides: not its options, nor their values.
    None at all where Hydra will refuse the command line itself, or where its words are a
    shell-completion query (``-sc install=bash``)."""
    namespace = _hydra_arguments(tuple(args))
    if namespace is None or namespace.shell_completion:
        return []
    return list(namespace.overrides)


# What Hydra's override grammar reads as a plain value; any other is quoted for it.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./+-]+")


def override_value(value: str) -> str:
    """``value`` as Hydra's override grammar reads it back: quoted where it has spaces, commas
    and the like (backslashes doubled only before a quote, as Hydra reads them; ``${`` escaped,
    which would start an OmegaConf interpolation once the value is in the config)."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    escaped = re.sub(r'(\\*)"', lambda m: 2 * m.group(1) + '\\"', value)
    escaped = re.sub(r"(\\+)$", lambda m: 2 * m.group(1), escaped)
    return '"' + escaped.replace("${", "\\${") + '"'


def resume_command(args: Sequence[str], folder: Path, sweep: bool) -> str:
    """``skinclf train ARGS`` that continues a stopped launch, to paste into a shell: the user's
    ``args`` with the launch's folder as ``hydra.run.dir`` plus ``resume=true`` (a run), or as
    ``hydra.sweep.dir`` (a sweep, which resumes its stopped jobs when launched again), in place
    of any such override given."""
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    replaced = {key} if sweep else {key, "resume"}
    overrides = set(_override_words(list(args)))
    kept = [arg for arg in args if arg not in overrides or override_key(arg) not in replaced]
    added = [f"{key}={override_value(str(folder))}", *([] if sweep else ["resume=true"])]
    return shlex.join(["skinclf", "train", *kept, *added])


def _check_hydra_options(args: list[str]) -> None:
    """Hydra's options that do not go together: one line, where Hydra raises a ValueError (a
    traceback) once it has parsed them."""
    namespace = _hydra_arguments(tuple(args))
    if namespace is None:
        return
    modes = {
        "--run": namespace.run,
        "--multirun": namespace.multirun,
        "--cfg": namespace.cfg,
        "--info": namespace.info,
        "--shell-completion": namespace.shell_completion,
    }
    chosen = [option for option, given in modes.items() if given]
    if len(chosen) > 1:
        raise SkinclfError(f"{' and '.join(chosen)}: expected only one of {', '.join(modes)}")
    if namespace.resolve and not (namespace.cfg or namespace.help):
        raise SkinclfError("--resolve: expected it with --cfg (or --help), whose config it resolves")


def _parsed_overrides(args: list[str]) -> Iterator[tuple[str, Override, list | None]]:
    """(the argument as typed, Hydra's parse of it, its values: several for a sweep, None for one
    that only Hydra expands, such as a glob) for each override; one Hydra's grammar refuses
    (``data.root=[a``, ``trainer.max_epochs`` without ``=``) is one line naming it, where Hydra
    prints three."""
    for arg in _override_words(args):
        yield arg, *_parse_override(arg)


def _is_sweep(args: list[str]) -> bool:
    """Whether ``args`` launch a sweep: -m, or experiment=paper and hparams_search=grid, which
    set hydra.mode=MULTIRUN themselves."""
    namespace = _hydra_arguments(tuple(args))
    multirun = namespace is not None and namespace.multirun
    return (
        multirun
        or "hydra.mode=MULTIRUN" in _override_words(args)
        or any(
            override.key_or_group in {"experiment", "hparams_search"} and values != [None]
            for _, override, values in _parsed_overrides(args)
        )
    )


@functools.cache
def _parse_override(arg: str) -> tuple[Override, list | None]:
    """:func:`_parsed_overrides` for one argument, parsed once for all the checks that read it."""
    try:
        override = OverridesParser.create().parse_overrides([arg])[0]
    except OverrideParseException as err:
        if "=" not in arg.lstrip("~"):
            raise SkinclfError(
                f"{arg}: no value; expected key=value (trainer.max_epochs=2, not trainer.max_epochs 2)"
            ) from err
        raise SkinclfError(
            f"{arg}: {first_line(err).rstrip('.')}; expected Hydra's override grammar (quote a "
            f"value with brackets, commas or spaces: 'key=\"a,b\"'; {OVERRIDE_GRAMMAR})"
        ) from err
    try:
        values = (
            list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        )
    except Exception:  # noqa: BLE001 - glob(...) and the like
        values = None
    return override, values


# Config groups that are chosen inside another config, not at the top: where each goes.
NESTED_GROUPS = {"pipeline": "model.pipeline"}


def _check_group_choices(args: list[str]) -> None:
    """An unknown config choice (``model=resnt``, ``recipe=moden``, in a sweep too): one line
    naming it and the choices, exit 2, where Hydra prints a multi-line error and exits 1. What
    this cannot read (glob sweeps, interpolations) is left to Hydra."""
    if adds_config_folders(args):
        return  # configs of the user's own beside skinclf's: Hydra knows them, this check does not
    for arg, override, values in _parsed_overrides(args):
        group = override.key_or_group
        choices = [] if override.is_delete() else config_choices(group)
        if group in NESTED_GROUPS and not override.package and not override.is_delete():
            # Hydra's hint is +pipeline=..., which adds a config nothing reads.
            place = NESTED_GROUPS[group]
            raise SkinclfError(
                f"{arg}: a {group} goes in {place}; expected {group}@{place}={arg.split('=', 1)[1]}"
            )
        if choices and None in (values or []):  # Hydra's own error: a 25-line traceback
            raise SkinclfError(
                f"{arg}: expected one of {', '.join(choices)} (leave {group} out for its default)"
            )
        for value in values or []:
            if choices and isinstance(value, str) and "${" not in value and value not in choices:
                key = override_key(arg)  # as typed: pipeline@model.pipeline
                known = ", ".join(choices)
                if group == "model":  # the README's "A model of your own", its folder left out
                    known += " (or a model config of your own: add its folder with hydra.searchpath)"
                raise SkinclfError(f"{key}={value}: unknown {group}; expected one of {known}")


def _check_sweeps_have_values(args: list[str]) -> None:
    """A swept value that expands to nothing (``model=glob(zzz*)``, ``seed=range(0)``): one line
    before Hydra, which would launch no job (and submitit's launchers fail on an empty batch with
    an AssertionError; a re-launch into the sweep's folder read as a finished sweep of 0 jobs).
    An interval, which only a sampling sweeper can sweep, too."""
    sweepers = [v for _, o, v in _parsed_overrides(args) if o.key_or_group == "hydra/sweeper"]
    basic_sweeper = not sweepers or sweepers[-1] in ([None], ["basic"])
    for arg, override, values in _parsed_overrides(args):
        # Configs of the user's own are Hydra's to know: a glob may match them.
        choices = [] if adds_config_folders(args) else config_choices(override.key_or_group)
        if values is None and choices and isinstance(override.value(), Glob):
            values = override.value().filter(choices)  # what Hydra's glob will expand to
        if override.is_sweep_override() and values == []:
            raise SkinclfError(
                f"{arg}: expands to no value (a glob that matches no config, an empty range); "
                "expected at least one job"
            )
        if basic_sweeper and isinstance(override.value(), IntervalSweep):  # was Hydra's traceback
            raise SkinclfError(
                f"{arg}: Hydra's basic sweeper cannot sweep an interval; expected a list, range() "
                "or choice() of values (an interval needs a sampling sweeper: pip install "
                "hydra-optuna-sweeper, then hydra/sweeper=optuna)"
            )


def _check_grid_search_folds(args: list[str]) -> None:
    """``hparams_search=grid cv.folds=0`` on the command line: one line before the launch, as
    every job would be refused alike (train.check_settings), each as a failed job of a new sweep."""
    values = {override.key_or_group: values for _, override, values in _parsed_overrides(args)}
    searches = [search for search in values.get("hparams_search") or [] if search is not None]
    if searches and any(_is_zero(folds) for folds in values.get("cv.folds") or []):
        raise grid_search_without_folds(searches[0])


def _is_zero(value: object) -> bool:
    """Whether an override's value reads as 0: a sweep's values come as text (cv.folds=3,0), a
    single one as Hydra types it (00 as text, 0.0 as a float)."""
    try:
        return float(str(value)) == 0
    except ValueError:
        return False


def _check_sweeps_are_launched_as_sweeps(args: list[str]) -> None:
    """Several values without -m (``optim.lr=1e-3,1e-4``): one line, where Hydra prints four
    and exits 1."""
    if _is_sweep(args):
        return
    for arg, override, _ in _parsed_overrides(args):
        if override.is_sweep_override():
            raise SkinclfError(
                f"{arg}: several values make a sweep; add -m to train one run per value, or quote a "
                "value that holds a comma: 'key=\"a,b\"'"
            )


def check_override_keys(args: list[str]) -> list[str]:
    """A key that no config has (``trainer.max_epoch=3``, in a sweep too): one line naming it and
    the nearest key, or the choices whose configs have it (``data.root`` under data=synthetic),
    exit 2, where Hydra prints a multi-line error and exits 1. Keys are left to Hydra when a
    choice is a glob, which only Hydra expands.

    Returns the arguments that Hydra must be given as ``++key=value``: keys that only the
    sweep's choices have (``model.pretrained`` with ``model=vgg16,vgg16_ft``). Before any job,
    Hydra composes the config without the sweep's values (the default model=baseline: no such
    key) and refuses the whole launch; with ``++`` each job gets the key, and a job whose config
    lacks it refuses it (:func:`skinclf.train_command.check_appended_keys`) while the others run."""
    if adds_config_folders(args):
        return []
    groups: dict[str, list[str]] = {}  # the config choices given, by group@package
    typed = []  # (argument, key, values) of each key given
    for arg, override, values in _parsed_overrides(args):
        name = override.key_or_group
        if override.is_delete() or override.is_add() or override.is_force_add() or name.startswith("hydra"):
            continue  # +key and ++key have their own check (check_appended_keys); hydra's are Hydra's
        if config_choices(name):
            if values is None:
                return []
            groups[f"{name}@{override.package}" if override.package else name] = [str(v) for v in values]
        else:
            typed.append((arg, name, values))
    # Composed only when a key is given (`skinclf train` with no overrides pays nothing), and
    # each set of choices once.
    base = {group: values[0] for group, values in groups.items() if len(values) == 1}
    first = {group: values[0] for group, values in groups.items()}
    swept = [{**first, group: value} for group, values in groups.items() for value in values]
    forced = []
    for arg, key, values in typed:
        if _key_in_any(key, [base]):
            _check_value_shape(arg, key, values, _composed(tuple(base.items())))
        elif _key_in_any(key, swept):
            forced.append(arg)
        else:
            _refuse_missing_key(key, groups, first)
    return forced


def _refuse_missing_key(key: str, groups: dict[str, list[str]], first: dict[str, str]) -> None:
    """One line for a key that none of the chosen configs has: the configs that have it, or the
    nearest key."""
    having = {
        f"{group}={choice}"
        for group in sorted({*groups, "model", "data", "recipe"})
        for choice in config_choices(group.split("@", 1)[0])
        if _key_in_any(key, [{**first, group: choice}])
    }
    if having:
        chosen = ", ".join(f"{group}={value}" for group, value in first.items()) or "the defaults"
        raise SkinclfError(
            f"{key}: the configs chosen ({chosen}) have no such key; {', '.join(sorted(having))} have it"
        )
    near = difflib.get_close_matches(key, _dotted_keys(_composed(tuple(first.items()))), 1)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise SkinclfError(f"{key}: no skinclf config has this key{hint} (`skinclf train --help` lists them)")


def _check_value_shape(arg: str, key: str, values: list | None, reference: DictConfig | None) -> None:
    """A group of settings replaced by one value (``trainer=null``, ``recipe.augment=null``) or
    one setting given a list (``data.cache_dir=[a,b]``): one line, where the run would end in
    a traceback, or use a folder named "['a', 'b']" without a word."""
    if reference is None or values is None:
        return
    default = OmegaConf.select(reference, key, default=None, throw_on_resolution_failure=False)
    for value in values:
        if isinstance(default, DictConfig) and not isinstance(value, dict):
            first_key = next(iter(default), "KEY")
            raise SkinclfError(
                f"{arg}: {key} is a group of settings ({', '.join(map(str, default))}); expected "
                f"its keys set one by one ({key}.{first_key}=...)"
            )
        if isinstance(default, str | int | float | bool) and isinstance(value, list | dict):
            raise SkinclfError(f"{arg}: expected one value for {key} (default: {default}), not a list")
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if len(values) > 1 and numeric and isinstance(value, str) and not _reads_as_number(value):
            # A single run's check names it too, but a sweep would find it only in the job that
            # gets it, after the others trained.
            raise SkinclfError(
                f"{arg}: {value} is no finite number; expected numbers for {key} (default: {default})"
            )


def _one_interpolation(text: str) -> bool:
    """Whether ``text`` is one interpolation as a whole (``${a}``, ``${oc.env:LR,${b}}``), not one
    with text around it (``x${a}``, ``${a}-${b}``), which can never resolve to a number."""
    text = text.replace("\\", "")  # Hydra's escapes in a sweep's values
    if not text.startswith("${"):
        return False
    depth = 0
    for end, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "}" and depth == 0:
            return end == len(text) - 1
    return False


def _reads_as_number(text: str) -> bool:
    """Whether a swept value's text is a finite number as skinclf reads it, or an interpolation
    that may resolve to one. Sweeps give their values as Hydra's escaped text: ``${a.b}`` as
    ``$\\{a.b\\}``, a quoted ``'1'`` with its quotes (text that a number setting reads as the number)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # one pair of quotes
    if _one_interpolation(text):
        return True
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _composed(chosen: tuple[tuple[str, str], ...]) -> DictConfig | None:
    """The config composed with these group choices; None where it does not compose (a bad
    choice or value is Hydra's to report)."""
    return composed_or_none(tuple(f"{group}={value}" for group, value in chosen))


def _key_in_any(key: str, choices: list[dict[str, str]]) -> bool:
    """Whether the config composed with any of these group choices has the dotted ``key``; True
    where one does not compose."""
    for chosen in choices:
        cfg = _composed(tuple(chosen.items()))
        if cfg is None or holds_key(cfg, key):
            return True
    return False


def overrides_together(args: list[str]) -> list[str]:
    """``args`` as typed where Hydra's parser reads them; where it reads overrides only up to the
    first option (Hydra 1.3: `model=res_aug -m seed=0,1` ended in its usage and "unrecognized
    arguments: seed=0,1", Hydra issue 3053), the overrides first, each in its order, and the
    options after them; as typed where that line would mean anything else."""
    if _hydra_arguments(tuple(args)) is not None:
        return args
    parser = _hydra_parser()
    try:
        namespace, unknown = parser.parse_known_intermixed_args(list(args))
    except (_NotHydrasCommandLine, TypeError):  # TypeError: argparse's intermixed limits
        return args
    if unknown:
        return args
    overrides, options, taken = list(namespace.overrides), [], 0
    for arg in args:
        if taken < len(overrides) and arg == overrides[taken]:
            taken += 1
        else:
            options.append(arg)
    together = [*overrides, *options]
    try:  # an option's value that reads like an override could have been taken for one
        same = vars(parser.parse_args(together)) == vars(namespace)
    except _NotHydrasCommandLine:
        same = False
    return together if same else args


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every key of ``cfg`` as a dotted path (``trainer.max_epochs``)."""
    out = []
    for key, value in cfg.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, DictConfig):
            out += _dotted_keys(value, f"{prefix}{key}.")
    return out
