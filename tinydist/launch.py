"""python -m tinydist.launch: `accelerate launch` (or `--torchrun`) that keeps tinydist's exit codes (tinydist/runtime/launch.py)."""

import sys

from tinydist.runtime.launch import main

if __name__ == "__main__":
    sys.exit(main())
