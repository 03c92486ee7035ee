"""Serve a saved safety classifier as an OpenAI-compatible moderation endpoint."""

import sys

from safety_classifier.serving import main

if __name__ == "__main__":
    sys.exit(main())
