"""python -m tinydist.evaluate: score a checkpoint or an exported model on a split (tinydist/loop/evaluate.py)."""

import sys

from tinydist.loop.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
