"""The training recipe shared by the three strategies.

  data (checked) -> backbone + strategy (top-N: the frozen prefix runs once, cached) -> Trainer
  (class-weighted loss, eval every epoch, best checkpoint by validation AUPRC) -> save -> reload
  the saved classifier -> score validation, fit the calibration of P(unsafe) on its logits, pick
  the threshold (max F1, or a target precision/recall) on calibrated scores -> score test with
  both -> publish.

Validation and test are scored by the classifier as reloaded from disk, so metrics.json
describes exactly what `infer.py` will answer.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import PartialState
from datasets import Dataset
from scipy.special import expit
from sklearn.metrics import average_precision_score
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    ProgressCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import (
    DEFAULT_BATCH_ROWS,
    STRATEGIES,
    DataArguments,
    LoraArguments,
    ModelArguments,
    RunArguments,
    TopLayersArguments,
    default_head_learning_rate,
)
from .artifacts import (
    METADATA_FILE,
    load_classifier_model,
    portable_base_reference,
    publish_directory,
    save_classifier_files,
    write_json_atomically,
    write_metadata,
)
from .attention import use_training_attention
from .batching import TokenBudgetBatchSampler
from .calibration import (
    IDENTITY,
    Calibration,
    bootstrap_f1_interval,
    brier_score,
    choose_threshold,
    describe_rule,
    expected_calibration_error,
    fit_calibration,
)
from .categories import (
    category_loss_sum,
    category_metrics,
    category_rows,
    choose_category_thresholds,
    choose_route_threshold,
    format_category_table,
    reported_category_scores,
    row_categories,
    rows_with_a_category,
    safe_row_alarms,
    unsafe_verdicts,
)
from .console import EpochSummaryProgress
from .data import LabelledSplit, Splits, load_splits
from .embedded import resolve_model_reference
from .errors import DataError, ResumeMismatchError, ThresholdTargetError, TrainingDivergedError
from .formatting import encode_prompts, room_for_text
from .inference import category_scores_of, default_batch_tokens, device_scoring_batches, margins_of, predict_logits
from .labels import BINARY_LABELS, MISSING_TARGET, LabelSchema, split_logits
from .metrics import classification_metrics, f1_maximising_threshold, format_metrics_table
from .modeling import (
    LoraSettings,
    build_model,
    count_parameters,
    default_device,
    load_tokenizer,
    resolve_dtype,
    trainable_head_parameters,
)
from .prefix_cache import (
    CachedPrefixCollator,
    CachedPrefixDataset,
    PrefixCacheTooLarge,
    TopLayersOnCachedPrefix,
    build_cached_dataset,
)
from .sources import add_sources, brings_categories


def class_weights_for(labels: np.ndarray, scheme: str = "balanced") -> torch.Tensor:
    """The loss weights of (safe, unsafe) over the rows with a binary label.

    balanced: n / (2 n_c), each class contributes equally (scikit-learn's "balanced"); sqrt: the
    square roots of those, rescaled so that the mean weight over the rows stays 1 (half-way to no
    weighting, in log terms); none: 1 and 1.
    """
    labels = labels[labels >= 0]
    if scheme == "none":
        return torch.ones(2, dtype=torch.float32)
    weights = compute_class_weight("balanced", classes=np.arange(2), y=labels)
    if scheme == "sqrt":
        weights = np.sqrt(weights)
        weights /= weights[labels].mean()
    elif scheme != "balanced":
        raise ValueError(f"class weights must be balanced, sqrt or none, not {scheme!r}")
    return torch.tensor(weights, dtype=torch.float32)


def class_weight_labels(splits: Splits, rows: str = "all") -> np.ndarray:
    """The training labels the class weights are computed from: every row's, or ("main_source")
    only the main source's. ToxicChat's training rows are 14 % unsafe; with the 629 AILuminate
    prompts, all unsafe, 31 %, and "all" cuts a ToxicChat unsafe row's weight against a safe one's
    from 6.3 to 2.2."""
    if rows not in ("all", "main_source"):
        raise ValueError(f"class weight rows must be all or main_source, not {rows!r}")
    labels = splits.train.labels
    if rows == "main_source" and splits.train.sources is not None:
        return labels[splits.train.sources == splits.main_source]
    return labels


def weighted_cross_entropy(class_weights: torch.Tensor, rows_per_step: float | None = None,
                           category_loss_weight: float = 1.0):
    """A `Trainer(compute_loss_func=...)` loss: per-row cross-entropy times its class weight, plus,
    with a category head, `category_loss_weight` x the mean binary cross-entropy over categories of
    each row that has category targets.

    Token-budget batches hold 2 to 256 rows. With `rows_per_step` (their mean number of rows per
    optimizer step, over all processes) the sum is divided by that constant, so that every row
    weighs the same in an epoch whatever the size of its batch (a per-batch mean would give a row
    of a 2-row batch of long prompts 100 times the weight of a row among 200 short ones). Else,
    with `num_items_in_batch` (row-count batches, gradient accumulation, DDP), the sum is divided
    by the rows of the whole accumulated batch, as the Trainer expects; else it is the weighted mean.
    """
    if not math.isfinite(category_loss_weight) or category_loss_weight < 0:
        raise ValueError(f"--category-loss-weight must be a finite number >= 0, not {category_loss_weight}")

    def loss(outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        weights = class_weights.to(logits.device)
        category_sum = None
        if labels.ndim == 2:  # a category head: the binary label, then the category targets
            labels, targets = labels[:, 0].long(), labels[:, 1:]
            category_sum = category_loss_weight * category_loss_sum(logits[:, len(BINARY_LABELS):], targets)
            logits = logits[:, :len(BINARY_LABELS)]
        labelled = labels >= 0  # rows without a binary label add no binary loss
        per_row = F.cross_entropy(logits.float(), labels.clamp(min=0), weight=weights, reduction="none") * labelled
        if rows_per_step is not None and torch.is_grad_enabled():  # training; evaluation reports the mean
            divisor = rows_per_step
        elif num_items_in_batch is not None:
            divisor = num_items_in_batch
        else:
            divisor = weights[labels[labelled]].sum().clamp(min=1e-12)
            if category_sum is not None:  # evaluation: the mean of each part
                category_rows = (targets[:, 0] != MISSING_TARGET).sum().clamp(min=1)
                category_sum = category_sum * divisor / category_rows
        value = (per_row.sum() + (category_sum if category_sum is not None else 0.0)) / divisor
        if not torch.isfinite(value):
            raise TrainingDivergedError(f"the training loss became {value.item()}")
        return value

    return loss


def training_labels(split: LabelledSplit, binary_rows: np.ndarray | None = None) -> list:
    """Per row: the 0/1 label; with category targets, [binary label, category targets...] as floats
    (MISSING_TARGET where the row has none). With `binary_rows`, the other rows' binary label is -1:
    no binary loss, and not in the epochs' validation metrics."""
    labels = split.labels
    if binary_rows is not None:
        labels = np.full_like(split.labels, -1)
        labels[binary_rows] = split.labels[binary_rows]
    if split.categories is None or split.categories.shape[1] == 0:
        return labels.tolist()
    return np.column_stack([labels.astype(np.float32), split.categories]).tolist()


def tokenized_dataset(split: LabelledSplit, tokenizer, max_length: int, labels: list,
                      prompt_template: str | None = None) -> Dataset:
    """input_ids (`encode_prompts`, as every scoring path encodes) and `labels` (`training_labels`)
    only; padding, and with it the attention mask, happen per batch in the collator."""
    dataset = Dataset.from_dict({"text": split.texts, "labels": labels})
    return dataset.map(
        lambda batch: {"input_ids": encode_prompts(tokenizer, batch["text"], max_length, prompt_template)},
        batched=True,
        remove_columns=["text"],
        desc=f"tokenizing {split.name}",
    )


def training_inputs(plan: TrainingPlan, model: torch.nn.Module, tokenizer, splits: Splits) -> tuple:
    """(module the Trainer runs, train set, validation set, collator).

    Top-N with `cache_prefix`: the frozen embeddings and bottom blocks give the same hidden states
    every epoch, so they run once here and the Trainer runs only the top N blocks and the head on
    the cached states (`prefix_cache.py`). Otherwise: token ids, padded per batch.
    """
    max_length = plan.model.max_length
    # The epochs' validation AUPRC (which picks the checkpoint kept) counts the binary labels of the
    # rows calibration is fitted on, the main source's: all-unsafe category prompts would inflate it.
    labels = [training_labels(splits.train), training_labels(splits.validation, splits.calibration_rows)]
    top = plan.top_layers
    if plan.strategy == "top_layers" and top is not None and top.cache_prefix:
        budget = top.prefix_cache_max_mb * 2**20
        # The prefix runs before the Trainer would move the model: put it on this process's device
        # first, or a GPU run computes the frozen blocks on the CPU (measured: Phi-4-mini, 7-14 prompts/s).
        model.to(PartialState().device)
        try:
            cached = {}
            for split, split_labels in zip((splits.train, splits.validation), labels):
                cached[split.name] = build_cached_dataset(
                    model, tokenizer, split.texts, split_labels, top.num_layers, max_length,
                    max_cache_bytes=budget - sum(dataset.nbytes for dataset in cached.values()),
                    show_progress=is_global_main_process(), description=f"caching frozen prefix ({split.name})",
                    prompt_template=plan.model.prompt_template,
                )
        except PrefixCacheTooLarge as error:
            warnings.warn(f"{error} (--prefix-cache-max-mb); training uncached instead", stacklevel=2)
        else:
            if plan.gradient_checkpointing:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return (TopLayersOnCachedPrefix(model, top.num_layers), cached[splits.train.name],
                    cached[splits.validation.name], CachedPrefixCollator(tokenizer.pad_token_id))
    template = plan.model.prompt_template
    return (model, tokenized_dataset(splits.train, tokenizer, max_length, labels[0], template),
            tokenized_dataset(splits.validation, tokenizer, max_length, labels[1], template),
            DataCollatorWithPadding(tokenizer))


def row_lengths(dataset) -> list[int]:
    """Tokens per row of a training set: token ids, or cached prefix states."""
    if isinstance(dataset, CachedPrefixDataset):
        return [int(state.shape[0]) for state in dataset.states]
    return [len(ids) for ids in dataset["input_ids"]]


def train_batch_sampler(plan: TrainingPlan, dataset, world_size: int) -> TokenBudgetBatchSampler | None:
    """Token-budget batches where --max-batch-tokens asks for them (and --batch-size does not), else None:
    the Trainer's length-grouped batches of `plan.batch_rows` rows."""
    if plan.batch_rows is not None:
        return None
    return TokenBudgetBatchSampler(row_lengths(dataset), plan.run.max_batch_tokens, seed=plan.run.seed,
                                   num_shards=world_size)


def describe_batches(plan: TrainingPlan, sampler: TokenBudgetBatchSampler | None) -> str:
    if sampler is None:
        return f"{plan.batch_rows} rows per device, length-grouped"
    return (f"up to {sampler.max_batch_tokens} padded tokens, length-grouped ({len(sampler)} an epoch, "
            f"{sampler.mean_rows_per_batch:.1f} rows on average; the loss weighs every row alike)")


def trainer_metrics(eval_prediction: EvalPrediction) -> dict:
    """Per-epoch validation metrics of the safe/unsafe decision, on the rows that have a binary
    label; scores stay paired with `label_ids` whatever the sampler's order. With a category head,
    also the categories' macro AUPRC on the rows with category targets."""
    logits = eval_prediction.predictions
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
    labels = np.asarray(eval_prediction.label_ids)
    targets = None
    if labels.ndim == 2:
        labels, targets = labels[:, 0].astype(np.int64), labels[:, 1:]
    margins, category_logits = split_logits(logits)
    probabilities = expit(margins)
    labelled = labels >= 0
    labels, probabilities = labels[labelled], probabilities[labelled]
    metrics = classification_metrics(labels, probabilities, f1_maximising_threshold(labels, probabilities))
    metrics = {key: value for key, value in metrics.items() if key != "n" and value is not None}
    rows = category_rows(targets) if targets is not None else []
    if len(rows):
        aps = [average_precision_score(targets[rows, i], category_logits[rows, i])
               for i in range(targets.shape[1]) if 0 < targets[rows, i].sum() < len(rows)]
        if aps:
            metrics["category_macro_auprc"] = float(np.mean(aps))
    return metrics


@dataclass
class TrainingPlan:
    """Everything one run needs, gathered from the parsed arguments of a script."""

    strategy: str
    model: ModelArguments
    data: DataArguments
    run: RunArguments
    top_layers: TopLayersArguments | None = None
    lora: LoraArguments | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.strategy}")

    @property
    def learning_rate(self) -> float:
        if self.run.learning_rate:
            return self.run.learning_rate
        return STRATEGIES[self.strategy].default_learning_rate(self.lora.lora_r if self.lora else None)

    @property
    def trains_categories(self) -> bool:
        """Whether a further training source brings category labels (and so a category head)."""
        return brings_categories(self.data.extra_train_sources)

    @property
    def head_learning_rate(self) -> float:
        if self.run.head_learning_rate is not None:
            return self.run.head_learning_rate
        return default_head_learning_rate(self.trains_categories)

    @property
    def batch_rows(self) -> int | None:
        """Rows per training batch, or None for batches that fill `--max-batch-tokens`."""
        if self.run.batch_size is not None:
            return self.run.batch_size
        return None if self.run.max_batch_tokens is not None else DEFAULT_BATCH_ROWS

    @property
    def gradient_checkpointing(self) -> bool:
        if self.run.gradient_checkpointing is not None:
            return self.run.gradient_checkpointing
        return self.strategy == "qlora"

    def arguments_record(self) -> dict:
        record = {"strategy": self.strategy}
        for part in (self.model, self.data, self.run, self.top_layers, self.lora):
            if part is not None:
                record.update(dataclasses.asdict(part))
        record["learning_rate"] = self.learning_rate
        record["head_learning_rate"] = self.head_learning_rate
        record["batch_size"] = self.batch_rows
        record["gradient_checkpointing"] = self.gradient_checkpointing
        return record


def training_arguments(plan: TrainingPlan, dtype: torch.dtype, cached_prefix: bool = False,
                       evaluate: bool = True) -> TrainingArguments:
    """The Trainer's arguments for a plan; `evaluate=False` (the benchmark's timed epoch) neither
    evaluates nor checkpoints."""
    on_gpu = torch.cuda.is_available()
    run = plan.run
    per_epoch = "epoch" if evaluate else "no"
    return TrainingArguments(
        output_dir=str(plan.output_dir / "checkpoints"),
        num_train_epochs=run.epochs,
        learning_rate=plan.learning_rate,
        # With token-budget batches (batch_rows None) the train batch size is the sampler's, not this one.
        per_device_train_batch_size=plan.batch_rows or 1,
        per_device_eval_batch_size=(plan.batch_rows or 16) * 2,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        weight_decay=run.weight_decay,
        warmup_steps=run.warmup_fraction,  # a float below 1 is a fraction of the total steps
        lr_scheduler_type="linear",
        eval_strategy=per_epoch,
        save_strategy=per_epoch,
        save_total_limit=2,
        load_best_model_at_end=evaluate,
        metric_for_best_model="auprc",
        greater_is_better=True,
        # Similar lengths per batch: dynamic padding then wastes almost nothing.
        train_sampling_strategy="group_by_length",
        bf16=dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,
        # QLoRA turns it on in prepare_model_for_kbit_training, the cached top-N path in training_inputs.
        activation_checkpointing=plan.gradient_checkpointing and plan.strategy != "qlora" and not cached_prefix,
        activation_checkpointing_kwargs={"use_reentrant": False},
        label_names=["labels"],
        seed=run.seed,
        data_seed=run.seed,
        logging_steps=run.logging_steps,
        report_to="none",
        save_only_model=False,
    )


ELAPSED_FILE = "training_seconds.json"


class TrainingClock:
    """Training wall time that survives a resume: each checkpoint records the seconds spent up to
    it (from the run's start, data loading and caching included), and a resumed run adds its own
    to those of the checkpoint it resumed from. Work lost after the last checkpoint is not counted."""

    def __init__(self, started: float, resumed_from: Path | None):
        recorded = resumed_from / ELAPSED_FILE if resumed_from is not None else None
        self.started = started
        self.before = json.loads(recorded.read_text())["training_seconds"] if recorded and recorded.is_file() else 0.0

    def seconds(self) -> float:
        return self.before + time.time() - self.started


class ClassifierTrainer(Trainer):
    """The `Trainer`, with the classification head in a parameter group of its own learning rate.

    The head starts from random weights while everything else is pretrained: one small learning
    rate for both leaves the head barely trained (head-only on ToxicChat: validation loss 0.69 ->
    0.65 in 2 epochs at 5e-5). The scheduler scales every group alike. With a `clock`, every
    checkpoint records the training time spent up to it. With a `train_batch_sampler`, training
    batches come from it (token-budget batches) instead of `per_device_train_batch_size` rows.
    Evaluation batches fill `eval_batch_tokens` (the scoring budget).
    """

    def __init__(self, *args, head_parameters: list[torch.nn.Parameter], head_learning_rate: float,
                 clock: TrainingClock | None = None, train_batch_sampler: TokenBudgetBatchSampler | None = None,
                 eval_batch_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_ids = {id(parameter) for parameter in head_parameters}
        self._head_learning_rate = head_learning_rate
        self.clock = clock
        self.train_batch_sampler = train_batch_sampler
        self.eval_batch_tokens = eval_batch_tokens or default_batch_tokens(self.args.device)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(EpochSummaryProgress)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        # accelerate shards the global batch order, batch i to rank i % world size (the sampler
        # made the count a multiple of it), and skips the batches already trained on resume.
        return self._loader(self.train_dataset, self.train_batch_sampler, "training")

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """Validation in length-sorted token-budget batches too: the Trainer's batches of 32 rows in a
        shuffled order (group_by_length shuffles them) pad short prompts to the longest of 32 (280
        ToxicChat validation rows took 1 min 42 s that way). One process only: under DDP, processes would gather logits
        of unequal batch sizes."""
        if self.args.world_size > 1:
            return super().get_eval_dataloader(eval_dataset)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        batches = device_scoring_batches(np.asarray(row_lengths(dataset)), self.eval_batch_tokens, self.args.device)
        return self._loader(dataset, [batch.tolist() for batch in batches], "evaluation")

    def _loader(self, dataset, batch_sampler, description: str) -> DataLoader:
        if isinstance(dataset, Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's own files, so that every complete checkpoint (trainer_state.json
        # is written last) carries the time spent up to it.
        if self.clock is not None and self.is_world_process_zero():
            checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            checkpoint.mkdir(parents=True, exist_ok=True)
            write_json_atomically(checkpoint / ELAPSED_FILE, {"training_seconds": self.clock.seconds()})
        return super()._save_checkpoint(model, trial)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if any(group.get("classification_head") for group in optimizer.param_groups):
            return optimizer  # already split (the Trainer may ask again)
        head_groups = []
        for group in optimizer.param_groups:
            head = [p for p in group["params"] if id(p) in self._head_ids]
            if head:
                group["params"] = [p for p in group["params"] if id(p) not in self._head_ids]
                head_groups.append({**group, "params": head, "lr": self._head_learning_rate,
                                    "classification_head": True})
        optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        for group in head_groups:
            optimizer.add_param_group(group)
        return optimizer


def is_global_main_process() -> bool:
    """Rank 0 under torchrun (RANK is set before any process group exists), or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def print_main(*lines: str) -> None:
    if is_global_main_process():
        print(*lines, sep="\n", flush=True)


def write_predictions(path: Path, split: LabelledSplit, probabilities: np.ndarray, logits: np.ndarray | None = None,
                      category_codes: list[str] | None = None, category_scores: np.ndarray | None = None) -> None:
    """Per-row scores for curves and error analysis; rows are numbered as in the split (from 0).

    `unsafe_probability` is the calibrated P(unsafe), what `infer.py` answers; `uncalibrated_probability`
    (softmax[:, 1]) is kept beside it for reliability diagrams. With several sources, each row's
    `source`; with a category head, each row's category (`category`, empty where it has none) and
    each category's score as the classifier reports it (`score_S1`, ...).
    """
    columns = {"row": np.arange(len(split)), "label": split.labels, "unsafe_probability": probabilities}
    if logits is not None:
        columns["uncalibrated_probability"] = IDENTITY.probabilities(margins_of(logits))
    if split.sources is not None:
        columns["source"] = split.sources
    if category_codes:
        if split.categories is not None:
            columns["category"] = row_categories(split.categories, category_codes)
        for code, scores in zip(category_codes, category_scores.T):
            columns[f"score_{code}"] = scores
    pd.DataFrame(columns).to_csv(path, index=False, float_format="%.6g")


def split_metrics(split: LabelledSplit, margins: np.ndarray, calibration: Calibration, threshold: float,
                  verdicts: np.ndarray | None = None) -> dict:
    """The metrics of calibrated scores at `threshold` (of `verdicts` where given: a category route),
    plus ECE and Brier of the uncalibrated softmax."""
    metrics = classification_metrics(split.labels, calibration.probabilities(margins), threshold, verdicts)
    raw = IDENTITY.probabilities(margins)
    metrics["uncalibrated"] = {"ece": expected_calibration_error(split.labels, raw),
                               "brier": brier_score(split.labels, raw)}
    return metrics


def validation_history(trainer: Trainer) -> list[dict]:
    keys = ("auprc", "roc_auc", "f1", "precision", "recall", "accuracy", "loss", "category_macro_auprc")
    return [
        {"epoch": entry["epoch"], **{key: entry[f"eval_{key}"] for key in keys if f"eval_{key}" in entry}}
        for entry in trainer.state.log_history
        if "eval_auprc" in entry
    ]


REPORT_FILES = ("metrics.json", "validation_history.json", "validation_predictions.csv", "test_predictions.csv")


def clear_previous_results(output_dir: Path) -> None:
    """A rerun rewrites the directory: the old classifier stops counting as complete at once
    (its metadata goes first), and no report or merged model of the old run is left to mislead."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if not is_global_main_process():
        return
    (output_dir / METADATA_FILE).unlink(missing_ok=True)
    for name in REPORT_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "merged", ignore_errors=True)


# Options that change nothing about the trained weights may differ on resume.
_RESUME_NEUTRAL_OPTIONS = ("resume", "keep_checkpoints", "merge", "logging_steps", "output_dir",
                           "calibration", "threshold_for_precision", "threshold_for_recall", "category_route_recall")
_RUN_ARGUMENTS_FILE = "run_arguments.json"


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints newest first, only those whose trainer_state.json (written last) exists."""
    found = [path for path in checkpoints_dir.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    found.sort(key=lambda path: int(path.name.split("-")[-1]), reverse=True)
    return [path for path in found if (path / "trainer_state.json").is_file()]


def checkpoint_to_resume(plan: TrainingPlan) -> Path | None:
    """The last complete checkpoint of an interrupted run with the same arguments, if any.

    A checkpoint cut short by a kill (no trainer_state.json) is removed; checkpoints of a run
    with other arguments are refused rather than silently mixed into this one. Only the main
    process changes files; under torchrun the other ranks read the same decision.
    """
    checkpoints_dir = plan.output_dir / "checkpoints"
    arguments = {k: v for k, v in plan.arguments_record().items() if k not in _RESUME_NEUTRAL_OPTIONS}
    main = is_global_main_process()
    resumable = None
    if checkpoints_dir.is_dir() and plan.run.resume:
        complete = complete_checkpoints(checkpoints_dir)
        for path in checkpoints_dir.glob("checkpoint-*"):
            if path not in complete and main:
                shutil.rmtree(path, ignore_errors=True)
        recorded_path = checkpoints_dir / _RUN_ARGUMENTS_FILE
        if complete:
            recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
            differing = sorted(key for key in set(recorded) | set(arguments) if recorded.get(key) != arguments.get(key))
            if differing:
                raise ResumeMismatchError(
                    f"{checkpoints_dir} holds checkpoints of a run with other arguments (differing: "
                    f"{', '.join(differing)}); pass --no-resume to start over, or use another --output-dir"
                )
            resumable = complete[0]
    elif checkpoints_dir.is_dir() and main:
        shutil.rmtree(checkpoints_dir)
    if main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(checkpoints_dir / _RUN_ARGUMENTS_FILE, arguments)
    return resumable


def load_training_splits(plan: TrainingPlan) -> Splits:
    """The checked train / validation / test splits of a plan (before any model is loaded), the
    further training sources' rows joined to train and validation (`sources.py`)."""
    data = plan.data
    splits = load_splits(
        train_file=data.train_file, validation_file=data.validation_file, test_file=data.test_file,
        text_column=data.text_column, label_column=data.label_column,
        validation_fraction=data.validation_fraction, seed=plan.run.seed,
        max_train_samples=data.max_train_samples, dataset=data.dataset, dataset_config=data.dataset_config,
    )
    if not data.extra_train_sources:
        return splits
    splits, schema = add_sources(
        splits, Path(data.train_file).stem if data.train_file else data.dataset.rsplit("/", 1)[-1],
        data.extra_train_sources, seed=plan.run.seed, validation_fraction=data.validation_fraction,
        taxonomy_file=data.taxonomy, category_rows_binary=data.category_rows_binary,
        contextual_categories=data.contextual_categories, safe_rows_category_negatives=data.safe_rows_category_negatives,
    )
    splits.schema = schema
    return splits


@dataclass
class TrainingSession:
    """A strategy's model and the Trainer set up to train it."""

    model: torch.nn.Module  # the classifier that is saved
    tokenizer: object
    trainer: ClassifierTrainer  # runs `model`, or its top on the cached prefix
    sampler: TokenBudgetBatchSampler | None
    class_weights: torch.Tensor
    cached_prefix: bool

    def describe(self, plan: TrainingPlan, splits: Splits) -> list[str]:
        trainable, total = count_parameters(self.model)
        datasets = (self.trainer.train_dataset, self.trainer.eval_dataset)
        sources = (["sources: " + ", ".join(f"{name} {count}" for name, count in
                                            zip(*np.unique(splits.train.sources, return_counts=True)))
                    + f" training rows; categories: {', '.join(splits.schema.codes) or 'none'}"]
                   if splits.train.sources is not None else [])
        return [
            f"strategy: {plan.strategy}   model: {plan.model.model}   "
            f"dtype: {str(resolve_dtype(plan.model.dtype)).replace('torch.', '')}",
            f"trainable params: {trainable:,} / total params: {total:,} ({100.0 * trainable / total:.4f} %)",
            f"rows: train {len(splits.train)}, validation {len(splits.validation)}, "
            f"test {len(splits.test) if splits.test else 0}; class weights (safe, unsafe): "
            f"{[round(w, 4) for w in self.class_weights.tolist()]}",
            *([f"frozen prefix cached: {sum(d.nbytes for d in datasets) / 2**20:,.1f} MiB"] if self.cached_prefix else []),
            *sources,
            f"batches: {describe_batches(plan, self.sampler)}; learning rate {plan.learning_rate:.3g}, "
            f"head {plan.head_learning_rate:.3g}",
        ]


def build_training_session(plan: TrainingPlan, splits: Splits, *, clock: TrainingClock | None = None,
                           evaluate: bool = True) -> TrainingSession:
    """Backbone + strategy, training inputs (cached prefix for top-N), batches, loss and Trainer."""
    model_path = resolve_model_reference(plan.model.model)
    dtype = resolve_dtype(plan.model.dtype)
    tokenizer = load_tokenizer(model_path, plan.model.trust_remote_code)
    if plan.model.prompt_template is not None:  # refused before the model loads, not at the first batch
        room_for_text(tokenizer, plan.model.prompt_template, plan.model.max_length)
    lora = plan.lora
    model = build_model(
        plan.strategy, model_path, tokenizer, dtype,
        num_layers=plan.top_layers.num_layers if plan.top_layers else 0,
        lora=(LoraSettings(lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.target_modules, lora.use_rslora)
              if lora else None),
        gradient_checkpointing=plan.gradient_checkpointing,
        trust_remote_code=plan.model.trust_remote_code,
        schema=splits.schema,
    )
    class_weights = class_weights_for(class_weight_labels(splits, plan.run.class_weights_rows), plan.run.class_weights)
    trained_module, train_dataset, validation_dataset, collator = training_inputs(plan, model, tokenizer, splits)
    cached_prefix = trained_module is not model
    arguments = training_arguments(plan, dtype, cached_prefix, evaluate=evaluate)
    # The model is still on the CPU here, also where the Trainer will move it to a GPU; switched after
    # the prefix cache, which only scores.
    if arguments.device.type == "cpu":
        use_training_attention(model)
    sampler = train_batch_sampler(plan, train_dataset, arguments.world_size)
    rows_per_step = (sampler.mean_rows_per_batch * arguments.world_size * arguments.gradient_accumulation_steps
                     if sampler is not None else None)
    trainer = ClassifierTrainer(
        model=trained_module,
        head_parameters=trainable_head_parameters(model),
        head_learning_rate=plan.head_learning_rate,
        clock=clock,
        train_batch_sampler=sampler,
        eval_batch_tokens=plan.run.max_batch_tokens,
        args=arguments,
        train_dataset=train_dataset,
        eval_dataset=validation_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=trainer_metrics,
        compute_loss_func=weighted_cross_entropy(class_weights, rows_per_step, plan.run.category_loss_weight),
    )
    return TrainingSession(model, tokenizer, trainer, sampler, class_weights, cached_prefix)


def run_training(session: TrainingSession, resume_from: Path | None, checkpoints_dir: Path) -> None:
    """`Trainer.train`, resumed if asked; a diverged loss names the step and the checkpoint kept."""
    trainer = session.trainer
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except TrainingDivergedError as error:
        kept = complete_checkpoints(checkpoints_dir)
        raise TrainingDivergedError(
            f"{error} at step {trainer.state.global_step + 1}; training stopped. "
            + (f"The last good checkpoint is kept: {kept[0]}. " if kept else "No checkpoint had been written yet. ")
            + "Lower --learning-rate, or check the data."
        ) from None


def train_classifier(plan: TrainingPlan) -> dict | None:
    """Run one strategy end to end; returns the metrics on the main process, None on the others.

    The steps: train (resuming from the last complete checkpoint), save the classifier to a staging
    directory, reload it from there and evaluate it (`evaluate_classifier`: calibration and
    thresholds fitted on validation, then the test file), then publish the directory."""
    started = time.time()
    set_seed(plan.run.seed)
    splits = load_training_splits(plan)
    output_dir = plan.output_dir
    clear_previous_results(output_dir)
    resume_from = checkpoint_to_resume(plan)

    clock = TrainingClock(started, resume_from)
    session = build_training_session(plan, splits, clock=clock)
    print_main(*session.describe(plan, splits))
    if resume_from is not None:
        print_main(f"resuming from {resume_from}")
    run_training(session, resume_from, output_dir / "checkpoints")
    train_seconds = clock.seconds()
    if not session.trainer.is_world_process_zero():
        return None

    history = validation_history(session.trainer)
    staging = output_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    metadata = classifier_metadata(plan, splits, session.model, train_seconds)
    # The cached path's Trainer holds a wrapper around the model's own top: save the whole model.
    save_classifier_files(session.model if session.cached_prefix else session.trainer.model, session.tokenizer,
                          staging, metadata)
    del session  # the trained model leaves memory before the saved one is loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    reloaded, tokenizer = load_classifier_model(
        staging, metadata, device=default_device(), dtype=plan.model.dtype,
        trust_remote_code=plan.model.trust_remote_code,
    )
    evaluation = evaluate_classifier(plan, splits, reloaded, tokenizer)
    metadata.update(evaluation.metadata(splits.schema))
    write_metadata(staging, metadata)
    if plan.run.merge and metadata["adapter"]:
        write_merged_classifier(reloaded, tokenizer, output_dir / "merged", metadata, plan)
    publish_directory(staging, output_dir)
    write_json_atomically(output_dir / "metrics.json", evaluation.metrics)
    write_json_atomically(output_dir / "validation_history.json", history)
    if not plan.run.keep_checkpoints:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    print(
        "",
        *evaluation.summary(splits),
        f"classifier written to {output_dir} in {time.time() - started:.0f} s (training {train_seconds:.0f} s)",
        sep="\n",
        flush=True,
    )
    return evaluation.metrics


def category_score_rule_for(plan: TrainingPlan) -> str:
    """"joint" unless safe rows taught the head "no category" (`categories.py` says why)."""
    return "conditional" if plan.data.safe_rows_category_negatives else "joint"


def classifier_metadata(plan: TrainingPlan, splits: Splits, model: torch.nn.Module, train_seconds: float) -> dict:
    """`safety_classifier.json` as far as training knows it; evaluation adds calibration and thresholds."""
    trainable, total = count_parameters(model)
    return {
        "strategy": plan.strategy,
        "adapter": plan.strategy in ("lora", "qlora"),
        "base_model": portable_base_reference(plan.model.model),
        "quantization": "nf4" if plan.strategy == "qlora" else None,
        "max_length": plan.model.max_length,
        **({"prompt_template": plan.model.prompt_template} if plan.model.prompt_template is not None else {}),
        "labels": {str(index): label for index, label in splits.schema.id2label.items()},
        **({"categories": splits.schema.to_metadata(), "category_score_rule": category_score_rule_for(plan)}
           if splits.schema.has_categories else {}),
        "threshold": None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training_seconds": round(train_seconds, 1),
        "training_arguments": plan.arguments_record(),
    }


@dataclass
class Evaluation:
    """What `evaluate_classifier` fitted on validation and measured."""

    metrics: dict  # metrics.json
    calibration: Calibration
    threshold: float
    threshold_rule: dict
    category_thresholds: np.ndarray | None
    category_route_threshold: float | None = None

    def metadata(self, schema: LabelSchema) -> dict:
        """The entries of `safety_classifier.json` fitted on validation."""
        categories = ({"categories": [{**entry, "threshold": float(value)} for entry, value
                                      in zip(schema.to_metadata(), self.category_thresholds)],
                       "category_route_threshold": self.category_route_threshold}
                      if self.category_thresholds is not None else {})
        return {"calibration": self.calibration.to_metadata(), "threshold_rule": self.threshold_rule,
                "threshold": self.threshold, **categories}

    def summary(self, splits: Splits) -> list[str]:
        """The lines printed after training: the metrics table, calibration, threshold, categories."""
        validation = self.metrics["validation"]
        low, high = validation["f1_interval"]
        return [
            format_metrics_table(self.metrics),
            f"calibration ({self.calibration.describe()}"
            f"{f', on the {splits.main_source} rows' if splits.main_source else ''}): "
            f"validation ECE {validation['uncalibrated']['ece']:.4f} uncalibrated -> {validation['ece']:.4f}, "
            f"Brier {validation['uncalibrated']['brier']:.4f} -> {validation['brier']:.4f}",
            f"decision threshold ({describe_rule(self.threshold_rule)}, calibrated scores): {self.threshold:.4f}; "
            f"validation F1 {validation['f1']:.4f}, 95 % bootstrap interval [{low:.4f}, {high:.4f}]",
            *([describe_category_route(validation["categories"]),
               "categories (validation rows of the category sources; each at its own threshold):",
               format_category_table(validation["categories"])] if self.category_thresholds is not None else []),
        ]


def describe_category_route(categories: dict) -> str:
    """One line: the verdict's recall on the category validation rows, and the route's part in it."""
    share = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    recall = (f"unsafe recall on the category validation rows {share(categories['binary_recall'], '.4f')}, on those "
              f"outside the contextual categories {share(categories['binary_recall_harmful'], '.4f')}")
    route = categories.get("category_route_threshold")
    if route is None:
        return recall + " (no category route)"
    return (f"{recall}, with the category route (largest category score >= {route:.4f} is unsafe too; without "
            f"it {share(categories['binary_recall_harmful_without_route'], '.4f')}); the main source's safe "
            f"validation rows called unsafe {share(categories['safe_rows_unsafe'], '.2%')} (without the route "
            f"{share(categories['safe_rows_unsafe_without_route'], '.2%')})")


def evaluate_classifier(plan: TrainingPlan, splits: Splits, model: torch.nn.Module, tokenizer) -> Evaluation:
    """Score the validation rows with the saved classifier, fit calibration, the decision threshold
    and any category thresholds on them, then score the test file; writes the prediction files."""
    output_dir = plan.output_dir
    logits = lambda split: predict_logits(  # noqa: E731
        model, tokenizer, split.texts, max_length=plan.model.max_length,
        max_batch_tokens=plan.run.max_batch_tokens, description=f"scoring {split.name}",
        prompt_template=plan.model.prompt_template,
    )
    # Calibration and threshold are both fitted on the main source's validation rows (see
    # `Splits.calibration_rows`), the threshold on calibrated scores.
    validation_logits = logits(splits.validation)
    all_validation_margins = margins_of(validation_logits)
    calibration_rows = splits.calibration_rows
    validation = splits.validation.subset(calibration_rows)
    validation_margins = all_validation_margins[calibration_rows]
    calibration = fit_calibration(validation_margins, validation.labels, plan.run.calibration)
    # Every validation row's calibrated score (those without a binary label too: category rows under a contextual policy).
    all_validation_scores = calibration.probabilities(all_validation_margins)
    validation_scores = all_validation_scores[calibration_rows]
    try:
        threshold, threshold_rule = choose_threshold(
            validation.labels, validation_scores,
            target_precision=plan.run.threshold_for_precision, target_recall=plan.run.threshold_for_recall,
        )
    except ThresholdTargetError as error:
        raise ThresholdTargetError(
            f"{error}. The checkpoints are kept in {output_dir / 'checkpoints'}: a rerun with another target "
            f"resumes from the last one instead of training again"
        ) from None
    category_scores = lambda split_logits, unsafe: (  # noqa: E731 (as the classifier will report them)
        reported_category_scores(category_scores_of(split_logits), unsafe, category_score_rule_for(plan))
        if splits.schema.has_categories else None)
    validation_category_scores = category_scores(validation_logits, all_validation_scores)
    category_thresholds = route_threshold = category_report = None
    if splits.schema.has_categories:
        category_thresholds, route_threshold, category_report = evaluate_categories(
            splits, validation_category_scores, all_validation_scores, threshold,
            route_recall=plan.run.category_route_recall, contextual_categories=plan.data.contextual_categories)
    # What the classifier will answer: P(unsafe) >= threshold, or a category route where one is stored.
    verdicts = lambda unsafe, categories: unsafe_verdicts(unsafe, categories, threshold, route_threshold)  # noqa: E731
    all_validation_verdicts = verdicts(all_validation_scores, validation_category_scores)
    metrics = {"validation": split_metrics(validation, validation_margins, calibration, threshold,
                                           all_validation_verdicts[calibration_rows])}
    f1_interval = bootstrap_f1_interval(validation.labels, validation_scores, threshold, seed=plan.run.seed,
                                        predicted=all_validation_verdicts[calibration_rows])
    metrics["validation"]["f1_interval"] = list(f1_interval)
    if splits.validation.sources is not None:
        labelled = splits.validation.binary_rows
        metrics["validation"]["sources"] = source_metrics(
            splits.validation.subset(labelled), all_validation_scores[labelled], threshold,
            all_validation_verdicts[labelled])
    if category_report is not None:
        metrics["validation"]["categories"] = category_report
    write_predictions(output_dir / "validation_predictions.csv", splits.validation, all_validation_scores,
                      validation_logits, splits.schema.codes, validation_category_scores)
    if splits.test is not None:
        test_logits = logits(splits.test)
        test_margins = margins_of(test_logits)
        test_scores = calibration.probabilities(test_margins)
        test_category_scores = category_scores(test_logits, test_scores)
        metrics["test"] = split_metrics(splits.test, test_margins, calibration, threshold,
                                        verdicts(test_scores, test_category_scores))
        if category_thresholds is not None:
            safe = splits.test.labels == 0
            metrics["test"].update(safe_row_alarms(test_scores[safe], test_category_scores[safe], threshold,
                                                   category_thresholds, route_threshold))
        write_predictions(output_dir / "test_predictions.csv", splits.test, test_scores,
                          test_logits, splits.schema.codes, test_category_scores)
    return Evaluation(metrics, calibration, threshold, threshold_rule, category_thresholds, route_threshold)


def source_metrics(validation: LabelledSplit, scores: np.ndarray, threshold: float, verdicts: np.ndarray) -> dict:
    """The safe/unsafe metrics of each source's validation rows (AUPRC is None for a source whose
    rows are all unsafe; its recall is what counts there)."""
    return {str(name): classification_metrics(validation.labels[rows], scores[rows], threshold, verdicts[rows])
            for name in dict.fromkeys(validation.sources)
            for rows in [np.flatnonzero(validation.sources == name)]}


def evaluate_categories(splits: Splits, category_scores: np.ndarray, unsafe_scores: np.ndarray, threshold: float, *,
                        route_recall: float, contextual_categories: list[str]) -> tuple[np.ndarray, float | None, dict]:
    """Per-category thresholds (max F1) and metrics on the category sources' validation rows (those
    with a category); the category route's threshold (`categories.choose_route_threshold`, on the
    rows with a category outside `contextual_categories`; None where the decision threshold alone
    reaches `route_recall`, or it is 0); the verdict's recall on the category rows, overall, on the
    harmful ones and per category; and the category alarms on the main source's safe validation
    rows (`safe_row_alarms`)."""
    targets = splits.validation.categories
    rows = rows_with_a_category(targets)
    if not len(rows):
        raise DataError("the category sources left no validation rows; raise their validation= share")
    scores = category_scores[rows]
    thresholds = choose_category_thresholds(targets[rows], scores)
    metrics = category_metrics(splits.schema, targets[rows], scores, thresholds)
    harmful_codes = [index for index, code in enumerate(splits.schema.codes) if code not in contextual_categories]
    harmful = targets[rows][:, harmful_codes].max(axis=1) >= 1 if harmful_codes else np.zeros(len(rows), dtype=bool)
    binary = unsafe_scores[rows] >= threshold
    route = (choose_route_threshold(binary[harmful], scores[harmful].max(axis=1), route_recall)
             if route_recall > 0 and harmful.any() else None)
    calibration_rows = splits.calibration_rows
    safe = calibration_rows[splits.validation.labels[calibration_rows] == 0]
    metrics.update(safe_row_alarms(unsafe_scores[safe], category_scores[safe], threshold, thresholds, route))
    flagged = unsafe_verdicts(unsafe_scores[rows], scores, threshold, route)
    safe_flagged = unsafe_verdicts(unsafe_scores[safe], category_scores[safe], threshold, route)
    mean = lambda values: float(values.mean()) if len(values) else None  # noqa: E731
    metrics.update({"category_route_threshold": route, "binary_recall": mean(flagged),
                    "binary_recall_harmful": mean(flagged[harmful]), "safe_rows_unsafe": mean(safe_flagged)})
    if route is not None:
        metrics.update({"binary_recall_without_route": mean(binary),
                        "binary_recall_harmful_without_route": mean(binary[harmful]),
                        "safe_rows_unsafe_without_route": mean(unsafe_scores[safe] >= threshold)})
    metrics["binary_recall_per_category"] = {
        code: float(flagged[targets[rows, index] == 1].mean()) for index, code in enumerate(splits.schema.codes)
        if (targets[rows, index] == 1).any()
    }
    return thresholds, route, metrics


def write_merged_classifier(model, tokenizer, directory: Path, metadata: dict, plan: TrainingPlan) -> None:
    """Adapters folded into full weights, loadable with AutoModelForSequenceClassification alone.
    `model` is the classifier as reloaded for scoring: already merged unless its backbone is NF4."""
    from peft import PeftModel

    if metadata["quantization"]:
        # Merging into 4-bit weights would round the update away: merge into a full-precision copy.
        base_path = resolve_model_reference(plan.model.model)
        from .modeling import load_sequence_classifier

        base = load_sequence_classifier(base_path, tokenizer, resolve_dtype(plan.model.dtype), plan.model.trust_remote_code,
                                        schema=LabelSchema.from_metadata(metadata))
        model = PeftModel.from_pretrained(base, plan.output_dir / ".staging")
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    staging = directory.with_name(directory.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    save_classifier_files(merged, tokenizer, staging, {**metadata, "adapter": False, "quantization": None,
                                                       "strategy": metadata["strategy"] + "+merged"})
    publish_directory(staging, directory)
    print(f"merged classifier written to {directory}", flush=True)
