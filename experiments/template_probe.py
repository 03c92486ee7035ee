"""A cheap screen of prompt templates: a logistic-regression probe on the frozen backbone's last-token
hidden state, with the texts read in each template, scored on the validation split only.

    python experiments/template_probe.py                                   # none and chat
    python experiments/template_probe.py --templates none chat "Prompt: {text}\\nSafe or unsafe?"

The same split, seed and max length as the results table (whose "frozen probe" baseline is the
`none` row here), texts encoded by the toolkit's own `encode_prompts`; C is chosen on validation
as the baseline does. A template that makes the frozen last token more telling is a candidate for
`--prompt-template` in fine-tuning, which then decides on validation.
Prints one JSON line per template. No test file is read.
"""

from __future__ import annotations

import argparse
import json
import time

from compare_methods import DATA_DIR, MAX_LENGTH, SEED, VALIDATION_FRACTION
from sklearn.metrics import average_precision_score

from safety_classifier.console import quiet_library_noise

NO_TEMPLATE = "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", nargs="+", default=[NO_TEMPLATE, "chat"],
                        help=f"'{NO_TEMPLATE}' (the text as it is), 'chat', or strings with one {{text}}")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    args = parser.parse_args(argv)
    quiet_library_noise()

    import torch

    from safety_classifier.baselines import fit_logistic_probe, frozen_features
    from safety_classifier.data import load_splits
    from safety_classifier.embedded import EMBEDDED_ALIAS, resolve_model_reference
    from safety_classifier.formatting import check_prompt_template
    from safety_classifier.modeling import load_sequence_classifier, load_tokenizer, resolve_dtype

    templates = [None if template == NO_TEMPLATE else template for template in args.templates]
    for template in templates:
        check_prompt_template(template)
    splits = load_splits(train_file=f"{args.data_dir}/toxicchat0124_train.csv", validation_file=None, test_file=None,
                         text_column="user_input", label_column="toxicity",
                         validation_fraction=VALIDATION_FRACTION, seed=SEED)
    torch.manual_seed(SEED)
    model_path = resolve_model_reference(EMBEDDED_ALIAS)
    tokenizer = load_tokenizer(model_path)
    backbone = load_sequence_classifier(model_path, tokenizer, resolve_dtype("auto"))
    for template in templates:
        started = time.time()
        features = {split.name: frozen_features(backbone, tokenizer, split.texts, max_length=MAX_LENGTH,
                                                prompt_template=template, description=f"frozen features ({split.name})")
                    for split in (splits.train, splits.validation)}
        probe, c = fit_logistic_probe(features["train"], splits.train.labels,
                                      features["validation"], splits.validation.labels)
        auprc = average_precision_score(splits.validation.labels, probe.predict_proba(features["validation"])[:, 1])
        print(json.dumps({"template": template or NO_TEMPLATE, "validation_auprc": round(float(auprc), 4), "C": c,
                          "seconds": round(time.time() - started)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
