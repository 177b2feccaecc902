"""python -m tinydist.predict: top-5 labels for images from an exported model (tinydist/export/predict.py)."""

import sys

from tinydist.export.predict import main

if __name__ == "__main__":
    sys.exit(main())
