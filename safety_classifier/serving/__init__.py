"""A moderation service: the OpenAI `POST /v1/moderations` API over a saved classifier.

Applications that already call the hosted moderation API point their client's base URL here.
Each request is parsed and checked on the event loop (`protocol`), its texts are counted in
tokens on a tokenizer thread, and a `Batcher` gathers the waiting requests into one batch, up
to a budget of real tokens or a few milliseconds after the oldest arrived, scored by one
`Classifier.scores` call on the model thread (`batcher`): the event loop is never blocked by
the model, and the probabilities are those `infer.py` gives the same texts. A request may also
send one conversation, whose last message is judged in the context of the ones before
(`conversation`). `api_server` holds the routes and the entry point, `auth` the API key check,
`metrics` the Prometheus metrics, `memory` the process's memory settings, `cli_args` the command line.
"""

from .api_server import main

__all__ = ["main"]
