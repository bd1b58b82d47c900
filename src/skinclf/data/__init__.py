"""Image sources and batch pipelines.

Every source (``data.loader`` in conf/data/) returns an :class:`ImageSplits` of decoded uint8
images; the pipeline of the chosen model (conf/pipeline/) turns batches of them into model input.
"""

from skinclf.data.splits import ImageSplits, Split, load_splits

__all__ = ["ImageSplits", "Split", "load_splits"]
