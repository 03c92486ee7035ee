"""Fine-tune LoRA adapters on every linear layer of the blocks, and a classification head. See README.md."""

import sys

from safety_classifier.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("lora"))
