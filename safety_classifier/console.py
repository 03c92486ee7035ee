"""What a person running the scripts sees: the toolkit's own progress and warnings, not library chatter.

Silenced, because each is expected and alarms without informing: transformers' load report
when it lists only the freshly initialised classification head as MISSING (every new classifier
has one) and the unused LM head as UNEXPECTED,
its weight-loading progress bars, bitsandbytes' note that an optional CPU kernel package is
absent, and the FutureWarnings peft and the Trainer trigger by using transformers'
`*gradient_checkpointing*` names. Everything else (the toolkit's warnings, other library
warnings, errors) still reaches the user.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

import datasets
from transformers import ProgressCallback
from transformers.utils import logging as transformers_logging


def is_global_main_process() -> bool:
    """Rank 0 under torchrun (RANK is set before any process group exists), or a lone process: the
    one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


_EXPECTED_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",  # "Failed to load CPU gemm_4bit_forward from kernels-community"
)
# A load report row: "key | STATUS | ...", the status possibly wrapped in ANSI colour codes.
_REPORT_ROW = re.compile(r"^(?P<key>\S+)\s*\|\s*(?:\x1b\[[0-9;]*m)?(?P<status>[A-Z]+)")
# What loading a causal LM into a *ForSequenceClassification always reports: a new head, an unused LM head.
_EXPECTED_REPORT_ROWS = (
    ("MISSING", re.compile(r"^(score|classifier)\.(weight|bias)$")),
    ("UNEXPECTED", re.compile(r"^lm_head\.(weight|bias)$")),
)


class ExpectedLoadReportFilter(logging.Filter):
    """Drops transformers' LOAD REPORT when it lists only what every new classifier has: the
    freshly initialised classification head (MISSING) and the unused LM head (UNEXPECTED). A report
    with any other row (a missing block weight, a size mismatch) still reaches the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [match for line in message.splitlines() if (match := _REPORT_ROW.match(line.strip()))
                and match["key"] != "Key"]
        expected = lambda row: any(row["status"] == status and pattern.match(row["key"])  # noqa: E731
                                   for status, pattern in _EXPECTED_REPORT_ROWS)
        return not rows or not all(expected(row) for row in rows)


def quiet_library_noise() -> None:
    for name in _EXPECTED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    report_logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, ExpectedLoadReportFilter) for f in report_logger.filters):
        report_logger.addFilter(ExpectedLoadReportFilter())
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()  # tokenizing a few thousand prompts takes well under a second
    warnings.filterwarnings("ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning)


class EpochSummaryProgress(ProgressCallback):
    """The Trainer's progress bar, with the running loss in it and one line per validation instead
    of a printed dict of every log entry."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "eval_auprc" in logs:
            epochs = f"{state.epoch:.0f}/{args.num_train_epochs:g}" if state.epoch else "?"
            self.training_bar.write(
                f"epoch {epochs}: validation AUPRC {logs['eval_auprc']:.4f}, F1 {logs.get('eval_f1', float('nan')):.4f}"
                f" (uncalibrated), loss {logs.get('eval_loss', float('nan')):.4f}"
                + (f"; mean AUPRC over sources {logs['eval_source_macro_auprc']:.4f}, objective "
                   f"{logs['eval_mixture_objective']:.4f} (the best epoch on it is kept)"
                   if "eval_mixture_objective" in logs else "")
            )
        elif "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
