"""python -m tinydist.report: a run's curves as a PNG, preemptions marked (tinydist/export/report.py)."""

import sys

from tinydist.export.report import main

if __name__ == "__main__":
    sys.exit(main())
