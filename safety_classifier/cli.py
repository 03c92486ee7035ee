"""Entry points behind the top-level scripts: parse arguments, run, turn user errors into messages."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import HfArgumentParser

from .arguments import STRATEGIES, DataArguments, InferenceArguments, ModelArguments, RunArguments
from .console import quiet_library_noise
from .errors import SafetyClassifierError


def _exit_on_user_error(main: Callable[[], int | None]) -> int:
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    quiet_library_noise()
    try:
        return main() or 0
    except SafetyClassifierError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def parse_training_plan(strategy: str, argv: Sequence[str] | None = None):
    """The `TrainingPlan` of `train_<strategy>.py` from its command line."""
    from .training import TrainingPlan

    record = STRATEGIES[strategy]
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, record.arguments),
                              description=record.description)
    model, data, run, extra = parser.parse_args_into_dataclasses(args=argv)
    return TrainingPlan(
        strategy=strategy, model=model, data=data, run=run,
        top_layers=extra if strategy == "top_layers" else None,
        lora=extra if strategy != "top_layers" else None,
    )


def train_main(strategy: str, argv: Sequence[str] | None = None) -> int:
    """`train_<strategy>.py`: fine-tune, evaluate, save. Exit status 2 on bad input."""
    from .training import train_classifier

    plan = parse_training_plan(strategy, argv)

    def train() -> None:
        from .calibration import check_threshold_targets
        from .errors import ThresholdTargetError
        from .formatting import check_prompt_template

        # A bad target or template is refused now, not after the training it would waste.
        check_threshold_targets(plan.run.threshold_for_precision, plan.run.threshold_for_recall)
        check_prompt_template(plan.model.prompt_template)
        if not 0.0 <= plan.run.category_route_recall <= 1.0:
            raise ThresholdTargetError(f"--category-route-recall must be in [0, 1] (0: no route), "
                                       f"got {plan.run.category_route_recall}")
        train_classifier(plan)

    return _exit_on_user_error(train)


def train_full_layers_main() -> int:
    """Console command `safety-classifier-train-full-layers` (= train_full_layers.py)."""
    return train_main("top_layers")


def train_lora_main() -> int:
    """Console command `safety-classifier-train-lora` (= train_lora.py)."""
    return train_main("lora")


def train_qlora_main() -> int:
    """Console command `safety-classifier-train-qlora` (= train_qlora.py)."""
    return train_main("qlora")


def _read_stdin_prompts() -> list[str]:
    from .data import decode_utf8

    if sys.stdin is None or sys.stdin.isatty():
        return []
    text = decode_utf8(sys.stdin.buffer.read(), "standard input")
    return [line for line in text.splitlines() if line.strip()]


def infer_main(argv: Sequence[str] | None = None) -> int:
    """`infer.py`: score prompts given inline, in a file, or on stdin."""
    parser = HfArgumentParser(InferenceArguments, description="Score prompts with a saved safety classifier.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return _exit_on_user_error(lambda: _infer(args))


def _infer(args: InferenceArguments) -> int:
    from .data import extract_labels, read_prompts
    from .inference import load_classifier
    from .metrics import classification_metrics, format_metrics_table

    labels = None
    if args.examples:
        texts = list(args.examples)
    elif args.input_file:
        frame = read_prompts(args.input_file, args.text_column)
        texts = frame[args.text_column].tolist()
        if args.label_column:
            labels = extract_labels(frame, args.label_column, args.input_file)
    else:
        texts = _read_stdin_prompts()
    if not texts:
        print("error: nothing to score: give --examples, --input-file or prompts on stdin", file=sys.stderr)
        return 2
    if args.label_column and labels is None:
        print("error: --label-column needs --input-file", file=sys.stderr)
        return 2

    classifier = load_classifier(
        args.model_dir, device=args.device, dtype=args.dtype, base_model=args.base_model,
        trust_remote_code=args.trust_remote_code,
    )
    if args.threshold is not None:
        classifier.threshold = args.threshold
    results = list(classifier.classify(texts, max_batch_tokens=args.max_batch_tokens))
    for result in results:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            preview = result["text"].replace("\n", " ")
            preview = preview[:77] + "..." if len(preview) > 80 else preview
            # A classifier with a category head adds the flagged categories after the verdict ("-": none).
            flagged = ([",".join(code for code, on in result["categories"].items() if on) or "-"]
                       if "categories" in result else [])
            print(f"{result['label']:<7} {result['unsafe_probability']:.4f}  " + "  ".join([*flagged, preview]))
    if labels is not None:
        scores = [result["unsafe_probability"] for result in results]
        # F1 and the like are of the verdicts printed (a category route included), AUPRC of P(unsafe).
        metrics = classification_metrics(labels, scores, classifier.threshold,
                                         predicted=[result["label"] == "unsafe" for result in results])
        print(format_metrics_table({Path(args.input_file).name: metrics}), file=sys.stderr if args.json else sys.stdout)
        if args.metrics_out:
            Path(args.metrics_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
