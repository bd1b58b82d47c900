"""skinclf: melanoma vs nevus classification experiments (research aid, not a diagnostic device)."""

__version__ = "0.1.0"

# Label convention used everywhere: MEL (melanoma) is the positive class.
CLASS_NAMES = ("NV", "MEL")
