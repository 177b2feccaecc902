"""python -m tinydist.bench: speed and quality figures, each against a baseline in the same run
(the command: tinydist/bench/suite.py)."""

import sys

from tinydist.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
