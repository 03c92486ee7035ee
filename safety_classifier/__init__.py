"""Fine-tune a causal LM into a safe/unsafe content classifier (top-N layers, LoRA or QLoRA)."""

from .inference import Classifier, load_classifier, predict_unsafe_probabilities

__all__ = ["Classifier", "load_classifier", "predict_unsafe_probabilities"]
