"""Training entry point of SCSTClipCap.

    python train.py

The training stages are not part of this version yet: this command says so and exits with status 2.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: the training stages are not available in this version yet; "
             "see README.md for what the project provides today.")
