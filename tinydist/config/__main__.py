"""python -m tinydist.config [--config FILE] [--a.b=v ...]: print the resolved config (YAML); --help: every key."""

import sys

from tinydist.config.load import main

if __name__ == "__main__":
    sys.exit(main())
