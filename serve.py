"""Serve a saved safety classifier as an OpenAI-compatible moderation endpoint. See README.md, "Serving"."""

import sys

from safety_classifier.serving import main

if __name__ == "__main__":
    sys.exit(main())
