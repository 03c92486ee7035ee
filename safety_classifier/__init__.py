"""Fine-tune a causal LM into a safe/unsafe content classifier (top-N layers, LoRA or QLoRA)."""

from .calibration import Calibration
from .inference import Classifier, load_classifier, predict_logit_margins, predict_unsafe_probabilities

__all__ = ["Calibration", "Classifier", "load_classifier", "predict_logit_margins", "predict_unsafe_probabilities"]
