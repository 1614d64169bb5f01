import sys

from mmebm_dist.cli import main

sys.exit(main())
