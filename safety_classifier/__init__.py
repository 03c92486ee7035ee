"""Fine-tune a causal LM into a safe/unsafe content classifier (top-N layers, LoRA or QLoRA)."""

import logging

# bitsandbytes warns when it is imported, on CPUs with AVX512-BF16, that the optional `kernels`
# package is missing ("Failed to load CPU gemm_4bit_forward"): NF4 runs on its own CPU kernels
# without it. peft imports bitsandbytes before any script could quiet it, so this is set first.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .calibration import Calibration  # noqa: E402
from .inference import Classifier, load_classifier, predict_logit_margins, predict_unsafe_probabilities  # noqa: E402

__all__ = ["Calibration", "Classifier", "load_classifier", "predict_logit_margins", "predict_unsafe_probabilities"]
