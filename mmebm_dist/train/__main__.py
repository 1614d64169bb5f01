"""``python -m mmebm_dist.train ARGS`` = ``mmebm train ARGS``; the form ``accelerate launch -m mmebm_dist.train`` needs."""

import argparse
import sys

from mmebm_dist.train.cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m mmebm_dist.train", description=__doc__)
add_arguments(parser)
sys.exit(run(parser.parse_args()))
