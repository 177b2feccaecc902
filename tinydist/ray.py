"""python -m tinydist.ray: tinydist's training in Ray Train workers, with its exit codes (tinydist/engines/ray_train.py)."""

import sys

from tinydist.engines.ray_train import main

if __name__ == "__main__":
    sys.exit(main())
