"""The training recipe shared by the three strategies, step by step:

  data (checked) -> resume or start over -> backbone + strategy (top-N, or LoRA on the top K
  blocks: the frozen prefix runs once, cached) -> Trainer (class-weighted loss, eval every epoch, best checkpoint by validation
  AUPRC) -> save -> reload the saved classifier -> score validation, fit the calibration of
  P(unsafe) on its logits, pick the threshold on calibrated scores -> score test -> publish.

The components live beside it: the arguments and their defaults in `arguments.py`, the Trainer,
its loss and batches in `trainer.py`, resuming in `checkpoints.py`, and everything measured on
validation and test in `evaluation.py`.
"""

from __future__ import annotations

import gc
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import DataCollatorWithPadding, set_seed

from .arguments import TrainingPlan
from .artifacts import (
    load_classifier_model,
    portable_base_reference,
    publish_directory,
    save_classifier_files,
    write_json_atomically,
    write_metadata,
)
from .attention import use_training_attention
from .batching import TokenBudgetBatchSampler
from .checkpoints import checkpoint_to_resume, clear_previous_results, complete_checkpoints
from .console import is_global_main_process
from .data import LabelledSplit, Splits, load_splits
from .embedded import resolve_model_reference
from .errors import TrainingDivergedError
from .evaluation import EpochMetrics, evaluate_classifier, validation_history
from .export import export_classifier, write_export
from .formatting import encode_prompts, response_template_for, room_for_text
from .modeling import (
    LoraSettings,
    build_model,
    count_parameters,
    default_device,
    describe_dtype,
    load_tokenizer,
    resolve_dtype,
    trainable_head_parameters,
)
from .prefix_cache import CachedPrefixCollator, PrefixCacheTooLarge, TopLayersOnCachedPrefix
from .prefix_store import build_cached_dataset
from .sources import add_sources, describe_sources
from .trainer import (
    ClassifierTrainer,
    TrainingClock,
    class_weight_labels,
    class_weights_for,
    describe_batches,
    source_prior_offsets,
    train_batch_sampler,
    training_arguments,
    weighted_cross_entropy,
)


def train_classifier(plan: TrainingPlan) -> dict | None:
    """Run one strategy end to end; returns the metrics on the main process, None on the others.

    Validation and test are scored by the classifier as reloaded from its staging directory, so
    the metrics describe what `infer.py` will answer; the directory is published last."""
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
    metadata = classifier_metadata(plan, splits, session.model, train_seconds, session.prefix_seconds)
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


def print_main(*lines: str) -> None:
    if is_global_main_process():
        print(*lines, sep="\n", flush=True)


def load_training_splits(plan: TrainingPlan) -> Splits:
    """The checked train / validation / test splits of a plan (before any model is loaded), the
    further training sources' rows joined to train and validation (`sources.py`)."""
    data = plan.data
    seed = plan.run.seed if plan.run.split_seed is None else plan.run.split_seed
    splits = load_splits(
        train_file=data.train_file, validation_file=data.validation_file, test_file=data.test_file,
        text_column=data.text_column, label_column=data.label_column,
        validation_fraction=data.validation_fraction, seed=seed,
        max_train_samples=data.max_train_samples, dataset=data.dataset, dataset_config=data.dataset_config,
    )
    if not data.extra_train_sources:
        return splits
    splits, schema = add_sources(
        splits, Path(data.train_file).stem if data.train_file else data.dataset.rsplit("/", 1)[-1],
        data.extra_train_sources, seed=seed, validation_fraction=data.validation_fraction,
        taxonomy_file=data.taxonomy, category_rows_binary=data.category_rows_binary,
        contextual_categories=data.contextual_categories, safe_rows_category_negatives=data.safe_rows_category_negatives,
        main_weight=data.train_file_weight,
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
    prefix_seconds: float = 0.0  # spent this run obtaining the cached prefix's states (computed or read)
    source_offsets: dict[str, float] | None = None  # `--source-prior-offsets`, per source

    def describe(self, plan: TrainingPlan, splits: Splits) -> list[str]:
        trainable, total = count_parameters(self.model)
        datasets = (self.trainer.train_dataset, self.trainer.eval_dataset)
        top_k = plan.lora.adapted_top_layers if plan.lora is not None else None
        lora_layers = f" (adapters on the top {top_k} blocks)" if top_k is not None else ""
        sources = ([*describe_sources(splits), f"categories: {', '.join(splits.schema.codes) or 'none'}"]
                   if splits.train.sources is not None else [])
        return [
            f"strategy: {plan.strategy}{lora_layers}   model: {plan.model.model}   "
            f"dtype: {describe_dtype(plan.model.dtype)}",
            f"trainable params: {trainable:,} / total params: {total:,} ({100.0 * trainable / total:.4f} %)",
            f"rows: train {len(splits.train)}, validation {len(splits.validation)}, "
            f"test {len(splits.test) if splits.test else 0}; class weights (safe, unsafe): "
            f"{[round(w, 4) for w in self.class_weights.tolist()]}",
            *([f"frozen prefix cached: {sum(d.nbytes for d in datasets) / 2**20:,.1f} MiB"] if self.cached_prefix else []),
            *sources,
            *(["source prior offsets (unsafe logit, training only): "
               + ", ".join(f"{source} {offset:+.2f}" for source, offset in self.source_offsets.items())]
              if self.source_offsets else []),
            f"batches: {describe_batches(plan, self.sampler)}; learning rate {plan.learning_rate:.3g}, "
            f"head {plan.head_learning_rate:.3g}",
        ]


def build_training_session(plan: TrainingPlan, splits: Splits, *, clock: TrainingClock | None = None,
                           evaluate: bool = True) -> TrainingSession:
    """Backbone + strategy, training inputs (a cached prefix for top-N and top-K LoRA), batches, loss and Trainer."""
    model_path = resolve_model_reference(plan.model.model)
    dtype = resolve_dtype(plan.model.dtype)
    tokenizer = load_tokenizer(model_path, plan.model.trust_remote_code)
    if plan.model.prompt_template is not None:  # refused before the model loads, not at the first batch
        room_for_text(tokenizer, plan.model.prompt_template, plan.model.max_length)
    lora = plan.lora
    model = build_model(
        plan.strategy, model_path, tokenizer, dtype,
        num_layers=plan.full_layers.num_layers if plan.full_layers else 0,
        lora=(LoraSettings(lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.target_modules, lora.use_rslora,
                           lora.adapted_top_layers)
              if lora else None),
        gradient_checkpointing=plan.gradient_checkpointing,
        trust_remote_code=plan.model.trust_remote_code,
        schema=splits.schema,
    )
    class_weights = class_weights_for(class_weight_labels(splits, plan.run.class_weights_rows), plan.run.class_weights)
    source_offsets = source_prior_offsets(splits, plan.data.source_prior_offsets)
    inputs_started = time.time()
    trained_module, train_dataset, validation_dataset, collator = training_inputs(plan, model, tokenizer, splits,
                                                                                  source_offsets)
    cached_prefix = trained_module is not model
    prefix_seconds = time.time() - inputs_started if cached_prefix else 0.0
    arguments = training_arguments(plan, dtype, cached_prefix, evaluate=evaluate,
                                   best_metric=EpochMetrics.best_metric(splits))
    # The model is still on the CPU here, also where the Trainer will move it to a GPU; switched after
    # the prefix cache, which only scores.
    if arguments.device.type == "cpu":
        use_training_attention(model)
    sampler = train_batch_sampler(plan, train_dataset, arguments.world_size)
    rows_per_step = (sampler.mean_rows_per_batch * arguments.world_size * arguments.gradient_accumulation_steps
                     if sampler is not None else None)
    epoch_metrics = EpochMetrics(splits)
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
        compute_metrics=epoch_metrics,
        compute_loss_func=weighted_cross_entropy(class_weights, rows_per_step, plan.run.category_loss_weight),
    )
    epoch_metrics.row_order = lambda: trainer.eval_row_order
    return TrainingSession(model, tokenizer, trainer, sampler, class_weights, cached_prefix, prefix_seconds,
                           source_offsets)


def training_inputs(plan: TrainingPlan, model: torch.nn.Module, tokenizer, splits: Splits,
                    source_offsets: dict[str, float] | None = None) -> tuple:
    """(module the Trainer runs, train set, validation set, collator); the training rows' labels carry
    their source's offset where `source_offsets` has any.

    Top-N, or LoRA with --lora-layers top:K, with `cache_prefix`: the frozen embeddings and bottom
    blocks give the same hidden states every epoch, so they run once here and the Trainer runs only
    the top blocks (with their adapters), the norm and the head on the cached states
    (`prefix_cache.py`). Otherwise: token ids, padded per batch.
    """
    max_length = plan.model.max_length
    # The epochs' validation AUPRC (and loss) count the binary labels of the rows calibration is fitted
    # on, the main source's: all-unsafe category prompts would inflate it. EpochMetrics adds the others'.
    labels = [training_labels(splits.train, offsets=source_offsets),
              training_labels(splits.validation, splits.calibration_rows)]
    top_layers = plan.cached_top_layers
    if top_layers is not None:
        budget = plan.prefix_cache_max_bytes
        # The prefix runs before the Trainer would move the model: put it on this process's device
        # first, or a GPU run computes the frozen blocks on the CPU (bitsandbytes placed an NF4 one).
        if plan.strategy != "qlora":
            model.to(PartialState().device)
        try:
            cached = {}
            for split, split_labels in zip((splits.train, splits.validation), labels):
                cached[split.name] = build_cached_dataset(
                    model, tokenizer, encode_split(split, tokenizer, max_length, plan.model.prompt_template),
                    split_labels, top_layers,
                    max_cache_bytes=budget - sum(dataset.nbytes for dataset in cached.values()),
                    directory=plan.prefix_cache_dir,
                    show_progress=is_global_main_process(), description=f"caching frozen prefix ({split.name})",
                )
        except PrefixCacheTooLarge as error:
            warnings.warn(f"{error} (--prefix-cache-max-mb); training uncached instead", stacklevel=2)
        else:
            if plan.gradient_checkpointing and plan.strategy != "qlora":  # QLoRA's is on already
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return (TopLayersOnCachedPrefix(model, top_layers), cached[splits.train.name],
                    cached[splits.validation.name], CachedPrefixCollator(tokenizer.pad_token_id))
    template = plan.model.prompt_template
    return (model, tokenized_dataset(splits.train, tokenizer, max_length, labels[0], template),
            tokenized_dataset(splits.validation, tokenizer, max_length, labels[1], template),
            DataCollatorWithPadding(tokenizer))


def training_labels(split: LabelledSplit, binary_rows: np.ndarray | None = None,
                    offsets: dict[str, float] | None = None) -> list:
    """Per row: the 0/1 label; with category targets, [binary label, category targets...] as floats
    (MISSING_TARGET where the row has none). With `binary_rows`, the other rows' binary label is -1:
    no binary loss, and not in the epochs' validation metrics. With `offsets` (per source), each row
    ends with its source's offset (`trainer.source_prior_offsets`)."""
    labels = split.labels
    if binary_rows is not None:
        labels = np.full_like(split.labels, -1)
        labels[binary_rows] = split.labels[binary_rows]
    columns = [labels.astype(np.float32)]
    if split.categories is not None and split.categories.shape[1] > 0:
        columns.append(split.categories)
    if offsets:
        columns.append(np.array([offsets.get(str(source), 0.0) for source in split.sources], dtype=np.float32))
    return labels.tolist() if len(columns) == 1 else np.column_stack(columns).tolist()


def encode_split(split: LabelledSplit, tokenizer, max_length: int, prompt_template: str | None = None) -> list[list[int]]:
    """Token ids of each row (`encode_prompts`, as every scoring path encodes: prompts, or
    `PromptResponse` pairs in the pair template), each row cut at its source's own `max_length`
    where that is smaller than the run's."""
    limits = split.row_max_lengths(max_length)
    encoded: list[list[int]] = [[] for _ in range(len(split))]
    for limit in np.unique(limits):
        rows = np.flatnonzero(limits == limit)
        for row, ids in zip(rows, encode_prompts(tokenizer, [split.texts[i] for i in rows], int(limit), prompt_template)):
            encoded[row] = ids
    return encoded


def tokenized_dataset(split: LabelledSplit, tokenizer, max_length: int, labels: list,
                      prompt_template: str | None = None) -> Dataset:
    """input_ids (`encode_split`) and `labels` (`training_labels`) only; padding, and with it the
    attention mask, happen per batch in the collator. The ids are encoded before the Dataset is
    built: a Dataset column cannot hold prompts and (prompt, response) pairs together."""
    return Dataset.from_dict({"labels": labels, "input_ids": encode_split(split, tokenizer, max_length, prompt_template)})


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


def classifier_metadata(plan: TrainingPlan, splits: Splits, model: torch.nn.Module, train_seconds: float,
                        prefix_seconds: float = 0.0) -> dict:
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
        **({"categories": splits.schema.to_metadata(), "category_score_rule": plan.category_score_rule}
           if splits.schema.has_categories else {}),
        # Pairs are read in the pair template (`formatting.py`); older toolkits would read them as prompts.
        **({"responses": True, "response_template": response_template_for(plan.model.prompt_template)}
           if splits.train.has_pairs else {}),
        "threshold": None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training_seconds": round(train_seconds, 1),
        **({"prefix_cache_seconds": round(prefix_seconds, 2)} if prefix_seconds else {}),
        "training_arguments": plan.arguments_record(),
    }


def write_merged_classifier(model, tokenizer, directory: Path, metadata: dict, plan: TrainingPlan) -> None:
    """`--merge`: the export (`export.py`) beside the classifier. `model` is the classifier as
    reloaded for scoring: already merged unless its backbone is NF4, whose adapter the export
    merges into a full-precision copy of the base instead."""
    if metadata["quantization"]:
        export_classifier(plan.output_dir / ".staging", directory, dtype="fp32",
                          trust_remote_code=plan.model.trust_remote_code)
    else:
        write_export(model, tokenizer, metadata, directory)
    print(f"merged classifier written to {directory}", flush=True)
