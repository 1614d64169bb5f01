"""``mmebm classifiers train --data DIR``: train the classifiers that judge coherence on the real shards.

The data set's judge (``mmebm_dist.evaluate.judges``) trains its readers: for digit data sets (PolyMNIST,
MNIST-SVHN; any shapes) one digit classifier per modality; for the generated birds the image attribute
classifier (captions are read exactly, so they need none). Reports test accuracy and saves with the data's
manifest hash (evaluation refuses classifiers trained on other data).
"""

from __future__ import annotations

import argparse
import dataclasses

from mmebm_dist.evaluate.judges.birds import DEFAULTS as BIRDS_DEFAULTS
from mmebm_dist.evaluate.judges.digits import DEFAULTS as DIGIT_DEFAULTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("train", help="train the coherence classifiers on a dataset's train split")
    p.add_argument("--data", required=True, help="dataset directory written by `mmebm data`")
    p.add_argument("--out", default=None, help="output directory (default: DATA/classifiers)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the train split (digit classifiers)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the birds attribute classifier "
                        f"(default {BIRDS_DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {DIGIT_DEFAULTS['batch_size']} (birds: {BIRDS_DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate, default {DIGIT_DEFAULTS['lr']} (the digit reference: 1e-3; "
                        f"birds: {BIRDS_DEFAULTS['lr']})")
    p.add_argument("--width", type=int, default=None,
                   help=f"channel multiplier of the MoPoE/MMVAE+ CNN, default {DIGIT_DEFAULTS['width']} (the "
                        f"reference: 1, i.e. 10/20 channels); birds: base channels, default "
                        f"{BIRDS_DEFAULTS['width']}")
    p.add_argument("--conv-dropout", type=float, default=0.1, help="2-D dropout after each conv (ref.: 0.5)")
    p.add_argument("--fc-dropout", type=float, default=0.2, help="dropout after the hidden fc (ref.: 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-buffer", type=int, default=2000, help="samples in the shuffle buffer")
    p.add_argument("--num-workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from mmebm_dist.evaluate.judges import judge_module
    from mmebm_dist.evaluate.judges.options import TrainOptions

    options = TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})
    return judge_module(options.data).train(options)
