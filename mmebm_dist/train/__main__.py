"""``python -m mmebm_dist.train ARGS``, i.e. ``mmebm train ARGS``, as ``accelerate launch -m`` needs it."""

import sys

from mmebm_dist.cli import main

sys.exit(main(["train", *sys.argv[1:]], one_line_errors=True))
