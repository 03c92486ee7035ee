"""The Trainer the recipe runs: its arguments, batches, loss, class weights and clock.

`ClassifierTrainer` is the Hugging Face `Trainer` with the classification head at a learning rate of
its own, token-budget batches where asked for, and a clock that every checkpoint records.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import TrainingPlan, check_category_loss_weight
from .artifacts import write_json_atomically
from .batching import TokenBudgetBatchSampler, default_batch_tokens, device_scoring_batches
from .categories import category_loss_sum
from .console import EpochSummaryProgress
from .data import Splits
from .errors import TrainingDivergedError
from .labels import BINARY_LABELS, MISSING_TARGET
from .prefix_cache import CachedPrefixDataset
from .refusals import REFUSALS_SOURCE


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
    only the main source's, so that a further source of unsafe prompts does not lower the weight
    of the main source's unsafe rows."""
    if rows not in ("all", "main_source"):
        raise ValueError(f"class weight rows must be all or main_source, not {rows!r}")
    labels = splits.train.labels
    if rows == "main_source" and splits.train.sources is not None:
        return labels[splits.train.sources == splits.main_source]
    return labels


SOURCE_PRIOR_FLOOR = 0.05  # a source of only unsafe (or only safe) rows counts as 95 % (5 %) unsafe


def source_prior_offsets(splits: Splits, strength: float) -> dict[str, float]:
    """Per training source, `strength` x (the log-odds of its share of unsafe rows - the main source's).

    Most further sources are nearly all unsafe requests, so their form alone predicts the label: a
    classifier learns "a plain request is unsafe" and flags the main source's ordinary requests.
    Added to a row's unsafe logit in training only, the offset explains the source's share (a
    product of experts with a model that knows the source alone), so the shared weights learn what
    sets unsafe rows apart within and across sources; scoring adds none, which leaves the classifier
    at the main source's prior, the traffic it is for. Shares are clipped to [0.05, 0.95].
    """
    train = splits.train
    if train.sources is None or strength == 0:
        return {}

    def log_odds(source) -> float:
        labels = train.labels[(train.sources == source) & (train.labels >= 0)]
        share = float(np.clip(labels.mean(), SOURCE_PRIOR_FLOOR, 1 - SOURCE_PRIOR_FLOOR))
        return math.log(share / (1 - share))

    main = log_odds(splits.main_source)
    # A source without binary labels (category rows only) adds no binary loss, so it needs none.
    labelled = dict.fromkeys(train.sources[train.labels >= 0])
    # The refusals are safe by construction: what sets a refusal apart is what the answer task learns.
    labelled.pop(REFUSALS_SOURCE, None)
    return {str(source): round(strength * (log_odds(source) - main), 4) for source in labelled}


def weighted_cross_entropy(class_weights: torch.Tensor, rows_per_step: float | None = None,
                           category_loss_weight: float = 1.0):
    """A `Trainer(compute_loss_func=...)` loss: per-row cross-entropy times its class weight, plus,
    with a category head, `category_loss_weight` x the mean binary cross-entropy over categories of
    each row that has category targets.

    Token-budget batches hold from a few rows to hundreds. With `rows_per_step` (their mean number
    of rows per optimizer step, over all processes) the sum is divided by that constant, so that
    every row weighs the same in an epoch whatever the size of its batch (a per-batch mean would
    give a row of a small batch of long prompts far more weight than one among many short ones).
    Else, with `num_items_in_batch` (row-count batches, gradient accumulation, DDP), the sum is
    divided by the rows of the whole accumulated batch, as the Trainer expects; else it is the
    weighted mean. Training labels may end with a column more than the head's categories need: each
    row's source prior offset (`source_prior_offsets`), added to its unsafe logit.
    """
    check_category_loss_weight(category_loss_weight)

    def loss(outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        weights = class_weights.to(logits.device)
        offsets = None
        if labels.ndim == 2 and labels.shape[1] == logits.shape[1]:  # [binary, categories..., offset]
            labels, offsets = labels[:, :-1], labels[:, -1]
            labels = labels[:, 0].long() if labels.shape[1] == 1 else labels
        category_sum = None
        if labels.ndim == 2:  # a category head: the binary label, then the category targets
            labels, targets = labels[:, 0].long(), labels[:, 1:]
            category_sum = category_loss_weight * category_loss_sum(logits[:, len(BINARY_LABELS):], targets)
            logits = logits[:, :len(BINARY_LABELS)]
        if offsets is not None:
            logits = logits.float() + F.pad(offsets.float()[:, None], (1, 0))
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


def training_arguments(plan: TrainingPlan, dtype: torch.dtype, cached_prefix: bool = False,
                       evaluate: bool = True, best_metric: str = "auprc") -> TrainingArguments:
    """The Trainer's arguments for a plan; `evaluate=False` (the benchmark's timed epoch) neither
    evaluates nor checkpoints. `best_metric`: the validation metric whose best epoch is kept
    (`EpochMetrics.best_metric`)."""
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
        metric_for_best_model=best_metric,
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

    def record(self, checkpoint: Path) -> None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        write_json_atomically(checkpoint / ELAPSED_FILE, {"training_seconds": self.seconds()})


class ForgetABestOfAnotherMetric(TrainerCallback):
    """A resumed checkpoint's state records the best value of its run's `metric_for_best_model`, not
    which metric that was: one saved when the checkpoint was kept on AUPRC alone would be compared
    with the mixture objective. Without any logged value of this run's metric, the record is dropped
    and the next evaluation becomes the best so far."""

    def on_train_begin(self, args, state, control, **kwargs):
        key = f"eval_{args.metric_for_best_model}"
        if state.best_metric is not None and not any(key in entry for entry in state.log_history):
            state.best_metric = state.best_model_checkpoint = None


class ClassifierTrainer(Trainer):
    """The `Trainer`, with the classification head in a parameter group of its own learning rate.

    The head starts from random weights while everything else is pretrained, so one small learning
    rate for both leaves the head barely trained; the scheduler scales every group alike. With a
    `clock`, every checkpoint records the training time spent up to it. With a
    `train_batch_sampler`, training batches come from it (token-budget batches) instead of
    `per_device_train_batch_size` rows. Evaluation batches fill `eval_batch_tokens` (the scoring budget);
    `eval_row_order` is the order of the validation rows in the last evaluation's predictions.
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
        self.eval_row_order: np.ndarray | None = None
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(EpochSummaryProgress)
        self.add_callback(ForgetABestOfAnotherMetric)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        # accelerate shards the global batch order, batch i to rank i % world size (the sampler
        # made the count a multiple of it), and skips the batches already trained on resume.
        return self._loader(self.train_dataset, self.train_batch_sampler, "training")

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """Validation in length-sorted token-budget batches too, since the Trainer's shuffled
        fixed-size batches pad short prompts to the longest among them. One process only: under
        DDP, processes would gather logits of unequal batch sizes, so there the Trainer's own
        sampler, listed once. `eval_row_order` is set for the validation set only."""
        dataset = (self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str)
                   else eval_dataset if eval_dataset is not None else self.eval_dataset)
        if self.args.world_size > 1:
            sampler = self._get_eval_sampler(dataset)
            order = list(sampler) if sampler is not None else list(range(len(dataset)))
            # accelerate gives batch i to process i % world size and gathers them back in this order.
            loader = self._get_dataloader(dataset, "evaluation", self.args.eval_batch_size, sampler_fn=lambda _: order)
        else:
            batches = device_scoring_batches(np.asarray(row_lengths(dataset)), self.eval_batch_tokens, self.args.device)
            order = np.concatenate(batches)
            loader = self._loader(dataset, [batch.tolist() for batch in batches], "evaluation")
        self.eval_row_order = np.asarray(order) if dataset is self.eval_dataset else None
        return loader

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        self.eval_row_order = None  # predictions of other rows than the validation set's
        return super().get_test_dataloader(test_dataset)

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
            self.clock.record(Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
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
