"""What a person running the scripts sees: the toolkit's own progress and warnings, not library chatter.

Silenced, because each is expected and alarms without informing: transformers' load report
listing the freshly initialised classification head as MISSING (every new classifier has one),
its weight-loading progress bars, bitsandbytes' note that an optional CPU kernel package is
absent, and the FutureWarnings peft and the Trainer trigger by using transformers'
`*gradient_checkpointing*` names. Everything else (the toolkit's warnings, other library
warnings, errors) still reaches the user.
"""

from __future__ import annotations

import logging
import warnings

from transformers import ProgressCallback
from transformers.utils import logging as transformers_logging

_EXPECTED_LOGGERS = (
    "transformers.utils.loading_report",  # "score.weight MISSING ... newly initialized"
    "bitsandbytes.backends.cpu.ops",  # "Failed to load CPU gemm_4bit_forward from kernels-community"
)


def quiet_library_noise() -> None:
    for name in _EXPECTED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
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
            )
        elif "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
