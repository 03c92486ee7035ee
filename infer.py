"""Score prompts with a saved safety classifier: --examples, --input-file, or stdin. See README.md."""

import sys

from safety_classifier.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main())
