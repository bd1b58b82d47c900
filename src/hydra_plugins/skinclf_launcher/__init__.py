"""skinclf's ``local`` launcher under a name Hydra accepts: Hydra takes launchers only from the
``hydra_plugins`` namespace package. The launcher itself is :mod:`skinclf.sweep.launcher`;
without the ``launchers`` extra (hydra-joblib-launcher) there is none, and this module defines
only :func:`register`."""

from hydra.core.plugins import Plugins

try:
    from skinclf.sweep.launcher import LocalLauncher as _LocalLauncher
except ModuleNotFoundError as err:
    if err.name not in {"hydra_plugins.hydra_joblib_launcher", "joblib"}:
        raise
    _LocalLauncher = None
else:

    class LocalLauncher(_LocalLauncher):
        """:class:`skinclf.sweep.launcher.LocalLauncher`."""


def register() -> None:
    """Make the launcher known to Hydra. Hydra finds plugins by walking the ``hydra_plugins``
    folders, which misses this one when skinclf is installed in editable mode (pip install -e)."""
    if _LocalLauncher is not None:
        Plugins.instance().register(LocalLauncher)
