"""python -m tinydist.data: build (or check) the decoded caches a run reads, and say what is in them (tinydist/data/cache.py)."""

import sys

from tinydist.data.cache import main

if __name__ == "__main__":
    sys.exit(main())
