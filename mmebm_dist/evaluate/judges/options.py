"""The options of training a judge (``mmebm classifiers train``): a leaf module every judge imports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class TrainOptions:
    """How ``mmebm classifiers train`` trains a data set's judge; None: the judge's own default (its
    ``DEFAULTS``)."""

    data: str
    """Data set directory written by ``mmebm data``."""
    out: str | None = None
    """Output directory (None: DATA/classifiers)."""
    epochs: int = 2
    """Passes over the train split (digit classifiers)."""
    steps: int | None = None
    """Training steps of the birds attribute classifier (digit data sets refuse it)."""
    batch_size: int | None = None
    """Batch size."""
    lr: float | None = None
    """Adam learning rate."""
    width: int | None = None
    """Channel multiplier of the digit CNN; base channels of the birds classifier."""
    conv_dropout: float = 0.1
    """2-D dropout after each conv (digit classifiers)."""
    fc_dropout: float = 0.2
    """Dropout after the hidden fc (digit classifiers)."""
    seed: int = 0
    """Seed of the initialisation and the data order."""
    shuffle_buffer: int = 2000
    """Samples in the shuffle buffer (digit classifiers)."""
    num_workers: int = 1
    """Data-loader workers (digit classifiers)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
