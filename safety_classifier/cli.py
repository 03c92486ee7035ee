"""Entry points behind the top-level scripts: parse arguments, run, turn user errors into messages."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import HfArgumentParser

from .arguments import (
    STRATEGIES,
    DataArguments,
    InferenceArguments,
    ModelArguments,
    RunArguments,
    TrainingPlan,
)
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


def parse_training_plan(strategy: str, argv: Sequence[str] | None = None) -> TrainingPlan:
    """The `TrainingPlan` of `train_<strategy>.py` from its command line; each argument dataclass
    refuses a value out of its range as it is built (`ArgumentError` and the like)."""
    record = STRATEGIES[strategy]
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, record.arguments),
                              description=record.description)
    model, data, run, extra = parser.parse_args_into_dataclasses(args=argv)
    return TrainingPlan(
        strategy=strategy, model=model, data=data, run=run,
        full_layers=extra if strategy == "full_layers" else None,
        lora=extra if strategy != "full_layers" else None,
    )


def train_main(strategy: str, argv: Sequence[str] | None = None) -> int:
    """`train_<strategy>.py`: fine-tune, evaluate, save. Exit status 2 on bad input."""
    from .training import train_classifier

    def train() -> None:
        # Parsed inside: a value out of range is reported as any user error is, before data or a model loads.
        train_classifier(parse_training_plan(strategy, argv))

    return _exit_on_user_error(train)


def train_full_layers_main() -> int:
    """Console command `safety-classifier-train-full-layers` (= train_full_layers.py)."""
    return train_main("full_layers")


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
    """`infer.py`: score prompts given inline, in a file, or on stdin; or AI answers with their prompts."""
    parser = HfArgumentParser(InferenceArguments, description="Score prompts, or AI answers with the prompts they "
                                                              "answer, with a saved safety classifier.")
    # Parsed inside: a value out of range (`ArgumentError`) is reported as any user error is.
    return _exit_on_user_error(lambda: _infer(*parser.parse_args_into_dataclasses(args=argv)))


def _infer_inputs(args: InferenceArguments) -> tuple[list, list | None]:
    """What to score (prompts, or `PromptResponse` pairs) and, with --label-column, their labels."""
    from .data import extract_labels, read_prompts, require_column
    from .errors import DataError
    from .formatting import PromptResponse

    if args.examples:
        if args.responses is None:
            return list(args.examples), None
        return [PromptResponse(prompt, response) for prompt, response in zip(args.examples, args.responses)], None
    if not args.input_file:
        return _read_stdin_prompts(), None
    frame = read_prompts(args.input_file, args.text_column)
    texts = frame[args.text_column].tolist()
    if args.response_column:
        if Path(args.input_file).suffix.lower() == ".txt":
            raise DataError(f"{args.input_file}: a .txt file holds prompts only, one a line; --response-column "
                            "needs a CSV, JSONL, JSON or Parquet file")
        require_column(frame, args.response_column, args.input_file, "--response-column")
        # A blank cell stays a pair: an empty answer, judged (and safe by the empty-text rule).
        texts = [PromptResponse(prompt, response) for prompt, response in zip(texts, frame[args.response_column])]
    labels = extract_labels(frame, args.label_column, args.input_file) if args.label_column else None
    return texts, labels


def _preview(text: str, width: int) -> str:
    flat = text.replace("\n", " ")
    return flat[:width - 3] + "..." if len(flat) > width else flat


def _infer(args: InferenceArguments) -> int:
    from .inference import load_classifier
    from .metrics import classification_metrics, format_metrics_table
    from .modeling import describe_dtype

    texts, labels = _infer_inputs(args)
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
    device = next(classifier.model.parameters()).device
    # On standard error: standard output carries the verdicts (one JSON object a line with --json).
    print(f"model: {args.model_dir}   device: {device}   dtype: {describe_dtype(args.dtype, device)}", file=sys.stderr)
    if args.threshold is not None:
        classifier.set_threshold(args.threshold)
    if (args.responses is not None or args.response_column) and not classifier.judges_responses:
        warnings.warn(f"{args.model_dir} was not trained on answers with their prompts: how well it judges "
                      "answers has not been measured", stacklevel=1)
    results = list(classifier.classify(texts, max_batch_tokens=args.max_batch_tokens))
    for result in results:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
            continue
        # A pair shows the answer judged, then the prompt it answers.
        preview = (f"{_preview(result['response'], 60)}  (answering: {_preview(result['text'], 40)})"
                   if result["judged"] == "response" else _preview(result["text"], 80))
        # A classifier with a category head adds the flagged categories after the verdict ("-": none).
        flagged = ([",".join(code for code, on in result["categories"].items() if on) or "-"]
                   if "categories" in result else [])
        print(f"{result['label']:<7} {result['unsafe_probability']:.4f}  " + "  ".join([*flagged, preview]))
    if labels is not None:
        scores = [result["unsafe_probability"] for result in results]
        # F1 and the like are of the verdicts printed (a category route included), AUPRC of P(unsafe).
        judged = "response" if args.response_column else "prompt"
        metrics = classification_metrics(labels, scores, classifier.threshold_for(judged),
                                         predicted=[result["label"] == "unsafe" for result in results])
        print(format_metrics_table({Path(args.input_file).name: metrics}), file=sys.stderr if args.json else sys.stdout)
        if args.metrics_out:
            Path(args.metrics_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
