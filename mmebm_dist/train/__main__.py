"""``python -m mmebm_dist.train ARGS``, i.e. ``mmebm train ARGS``, as ``accelerate launch -m`` needs it."""

import argparse
import sys

from mmebm_dist.train.cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m mmebm_dist.train", description=__doc__)
add_arguments(parser)
sys.exit(run(parser.parse_args()))
