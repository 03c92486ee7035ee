"""Fine-tune the top N transformer blocks and a classification head; the rest stays frozen. See README.md."""

import sys

from safety_classifier.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("full_layers"))
