"""skinclf's launchers under names Hydra accepts: Hydra takes launchers only from the
``hydra_plugins`` namespace package. The launchers themselves are :mod:`skinclf.sweep.launcher`
(``local``) and :mod:`skinclf.sweep.cluster` (``slurm``, ``slurm_local``); without the
``launchers`` extra (hydra-joblib-launcher, hydra-submitit-launcher) there are none, and this
module defines only :func:`register`."""

from hydra.core.plugins import Plugins

# The modules the launchers extra brings: their absence means no launchers, anything else is a bug.
_EXTRA = {
    "hydra_plugins.hydra_joblib_launcher",
    "joblib",
    "hydra_plugins.hydra_submitit_launcher",
    "submitit",
}
_launchers = []

try:
    from skinclf.sweep.launcher import LocalLauncher as _LocalLauncher
except ModuleNotFoundError as err:
    if err.name not in _EXTRA:
        raise
else:

    class LocalLauncher(_LocalLauncher):
        """:class:`skinclf.sweep.launcher.LocalLauncher`."""

    _launchers.append(LocalLauncher)

try:
    from skinclf.sweep.cluster import SlurmLauncher as _SlurmLauncher
    from skinclf.sweep.cluster import SlurmLocalLauncher as _SlurmLocalLauncher
except ModuleNotFoundError as err:
    if err.name not in _EXTRA:
        raise
else:

    class SlurmLauncher(_SlurmLauncher):
        """:class:`skinclf.sweep.cluster.SlurmLauncher`."""

    class SlurmLocalLauncher(_SlurmLocalLauncher):
        """:class:`skinclf.sweep.cluster.SlurmLocalLauncher`."""

    _launchers += [SlurmLauncher, SlurmLocalLauncher]


def register() -> None:
    """Make the launchers known to Hydra. Hydra finds plugins by walking the ``hydra_plugins``
    folders, which misses these when skinclf is installed in editable mode (pip install -e)."""
    for launcher in _launchers:
        Plugins.instance().register(launcher)
