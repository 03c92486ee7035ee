"""serve.py's command-line arguments: the loading arguments infer.py has too, then the service's own."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from ..arguments import ArgumentError, ClassifierLoadingArguments, require

API_KEY_ENVIRONMENT = "SAFETY_CLASSIFIER_API_KEY"


def check_api_key(key: str, source: str) -> None:
    """Refuse a key that cannot travel in an HTTP header as `Bearer <key>`, or an empty one."""
    if not key:
        raise ArgumentError(f"{source} is empty: give a key, or unset it to serve without one")
    if not (key.isascii() and key.isprintable()) or any(character.isspace() for character in key):
        raise ArgumentError(f"{source} must be printable ASCII without spaces: it is sent in an HTTP header")


@dataclass
class ServeArguments(ClassifierLoadingArguments):
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: str | None = field(
        default=None, repr=False,
        metadata={"help": "Every route but /health then needs 'Authorization: Bearer <key>' (OpenAI clients send "
                          f"their api_key so). Default: the {API_KEY_ENVIRONMENT} environment variable, which keeps "
                          "the key out of the process list; neither: no key, anyone who reaches the port is served."},
    )
    model_name: str | None = field(
        default=None, metadata={"help": "The `model` named in responses; default: the model directory's name."}
    )
    max_gather_tokens: int | None = field(
        default=None,
        metadata={"help": "Real tokens of the requests gathered into one scoring call (sorted by length there and "
                          "run in passes of --max-batch-tokens); default 4 x --max-batch-tokens."},
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "How long the oldest waiting request may wait for others to share its batch."}
    )
    return_wait_share: float = field(
        default=0.05,
        metadata={"help": "After a batch, wait up to this share of its model time for the clients it answered to "
                          "send their next requests, so that they join the next batch (0: do not wait)."},
    )
    max_inputs: int = field(default=128, metadata={"help": "Most texts in one request (more: 413)."})
    max_body_bytes: int = field(default=1_048_576, metadata={"help": "Largest request body in bytes (larger: 413)."})
    graceful_timeout: int = field(
        default=30, metadata={"help": "Seconds SIGTERM waits for requests in flight before cancelling them."}
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata={"help": "Logging level."})
    malloc_arenas: int = field(
        default=2,
        metadata={"help": "glibc malloc arenas of the process (0: glibc's default, up to 8 per core; ignored when "
                          "MALLOC_ARENA_MAX is set or the C library is not glibc)."},
    )
    trim_heap: bool = field(
        default=True,
        metadata={"help": "After each batch, hand the heap's free pages back to the system (glibc's malloc_trim, on "
                          "the model thread): keeps memory flat under traffic."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api_key is not None:
            check_api_key(self.api_key, "--api-key")
        elif os.environ.get(API_KEY_ENVIRONMENT) is not None:  # the flag wins over the environment
            self.api_key = os.environ[API_KEY_ENVIRONMENT]
            check_api_key(self.api_key, API_KEY_ENVIRONMENT)
        require(0 <= self.port <= 65535, f"--port must be between 0 and 65535, not {self.port}")
        require(self.max_gather_tokens is None or self.max_gather_tokens >= 1,
                f"--max-gather-tokens must be at least 1, not {self.max_gather_tokens}")
        require(math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0,
                f"--max-wait-ms must be 0 or more, not {self.max_wait_ms}")
        require(0.0 <= self.return_wait_share <= 1.0,
                f"--return-wait-share must be between 0 and 1, not {self.return_wait_share}")
        require(self.max_inputs >= 1, f"--max-inputs must be at least 1, not {self.max_inputs}")
        require(self.max_body_bytes >= 1, f"--max-body-bytes must be at least 1, not {self.max_body_bytes}")
        require(self.graceful_timeout >= 0, f"--graceful-timeout must be 0 or more, not {self.graceful_timeout}")
        require(self.malloc_arenas >= 0, "--malloc-arenas must be 0 (glibc's default) or more")
