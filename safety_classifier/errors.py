"""Errors a user can fix. The command-line entry points print them without a traceback."""


class SafetyClassifierError(Exception):
    """Base class: bad input, a missing file, an unusable model directory."""


class DataError(SafetyClassifierError):
    """A data file, column or row that cannot be used for training or scoring."""


class ModelLoadError(SafetyClassifierError):
    """A model or classifier directory that cannot be loaded."""


class TrainingDivergedError(SafetyClassifierError):
    """The training loss became NaN or infinite."""


class ResumeMismatchError(SafetyClassifierError):
    """The checkpoints in the output directory belong to a run with other arguments."""


class ThresholdTargetError(SafetyClassifierError):
    """A target precision or recall for the decision threshold that is invalid or not reached on validation."""


class PromptTemplateError(SafetyClassifierError, ValueError):
    """A prompt template that is malformed, needs a chat template the tokenizer lacks, or leaves no room for a text."""
