"""skinclf: melanoma vs nevus classification experiments (research aid, not a diagnostic device)."""

__version__ = "0.1.0"

# The study's input: 128x128 RGB images (paper section 2); every source is decoded to it.
IMAGE_SIZE = 128
