"""skinclf: melanoma vs nevus classification experiments (research aid, not a diagnostic device)."""

__version__ = "0.1.0"
