"""Command-line arguments as dataclasses, parsed by `transformers.HfArgumentParser`, and the
`TrainingPlan` a training script gathers from them.

Each field becomes `--field-name` (and `--field_name`); a boolean defaulting to True also gets
`--no-field-name`. Each dataclass checks its values when it is built (`__post_init__`), so that a
bad value is refused as the command line is parsed, before any data or model loads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .calibration import check_threshold_targets
from .embedded import EMBEDDED_ALIAS
from .errors import SafetyClassifierError
from .formatting import check_prompt_template
from .labels import CONTEXTUAL_CATEGORIES
from .sources import brings_categories

# The training defaults, each read from here (arguments' help included). The learning rates were
# chosen on the validation split with the default row batches.
DEFAULT_BATCH_ROWS = 8  # training rows per device per step unless --batch-size or --max-batch-tokens says otherwise
FULL_LAYERS_LEARNING_RATE = 3e-4
ADAPTER_LEARNING_RATE = 4e-4  # LoRA's, which QLoRA takes too (the same adapters)
ADAPTER_SEARCHED_RANK = 16  # the LoRA rank ADAPTER_LEARNING_RATE was chosen at
HEAD_LEARNING_RATE = 1e-3
# A category head's outputs learn from the category rows alone, and under Adam a larger learning
# rate speeds them up where a larger loss weight hardly does.
CATEGORY_HEAD_LEARNING_RATE = 3e-3


def require(condition: bool, message: str) -> None:
    """Refuse a value out of its range (NaN fails every comparison, so it is refused too)."""
    if not condition:
        raise ArgumentError(message)


def _positive(value: float | None) -> bool:
    return value is None or (math.isfinite(value) and value > 0)


@dataclass
class ModelArguments:
    model: str = field(
        default=EMBEDDED_ALIAS,
        metadata={"help": f"Hub id, local directory, or '{EMBEDDED_ALIAS}' (the embedded default, no hub needed)."},
    )
    dtype: Literal["auto", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "Weights/compute dtype; auto = bf16 where the hardware has it, else fp32."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the model's repository."})
    max_length: int = field(default=1024, metadata={"help": "Truncate prompts to this many tokens (never pads)."})
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Read each text in a template, stored with the classifier: 'chat' (the tokenizer's chat "
                          "template, the text as the user's turn, then the assistant's turn begins) or a string with "
                          "one {text}. Default: the text as it is."},
    )

    def __post_init__(self) -> None:
        require(self.max_length >= 1, f"--max-length must be at least 1, not {self.max_length}")
        check_prompt_template(self.prompt_template)


@dataclass
class DataArguments:
    dataset: str = field(default="lmsys/toxic-chat", metadata={"help": "Hub data set, used when no --train-file."})
    dataset_config: str = field(default="toxicchat0124", metadata={"help": "Configuration of --dataset."})
    train_file: str | None = field(default=None, metadata={"help": "CSV, JSONL, JSON or Parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file; else carved from train."})
    test_file: str | None = field(default=None, metadata={"help": "Test file, scored once at the end."})
    text_column: str = field(default="user_input", metadata={"help": "Column holding the prompt."})
    label_column: str = field(default="toxicity", metadata={"help": "Column holding 0 (safe) / 1 (unsafe)."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Stratified share of train held out for validation when no file is given."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a stratified subset this size."})
    extra_train_sources: list[str] | None = field(
        default=None,
        metadata={"help": "Further training sources, each 'FILE,text=COLUMN[,response=COLUMN][,label=COLUMN]"
                          "[,category=COLUMN][,weight=W][,validation=F][,cap=N][,max_length=N][,refusals=N]'; FILE "
                          "may be a glob (one source per file). Blank labels and categories are allowed where a row "
                          "has the other; a category column adds a category head, a response column trains on "
                          "(prompt, response) pairs whose label judges the response, refusals=N pairs N unsafe "
                          "prompts with a refusal as a safe answer."},
    )
    train_file_weight: float = field(default=1.0, metadata={
        "help": "Times each training row of --train-file is seen an epoch beside --extra-train-sources (a weight=)."})
    source_prior_offsets: float = field(default=0.0, metadata={
        "help": "In training, add STRENGTH x each source's log-odds of unsafe (its rows' share, within [0.05, 0.95]) less "
                "the main source's to its rows' unsafe logit, so that a source's share of unsafe rows is not learnt "
                "from its style; scoring adds none. 0 (default): no offsets; 1: the whole difference."})
    taxonomy: str | None = field(
        default=None,
        metadata={"help": "JSON {code: name} or CSV (code,name) naming the categories; codes outside it are refused. "
                          "Default: the project's S1-S12 names, other codes named by themselves."},
    )
    # By default category rows teach categories only, safe main-source rows "no category", and the
    # category head is a second route to unsafe (--category-route-recall): calling every category row
    # unsafe would teach the safe/unsafe decision another source's notion of unsafe.
    category_rows_binary: Literal["unsafe", "unsafe_except_contextual", "unlabelled"] = field(
        default="unlabelled",
        metadata={"help": "The safe/unsafe label of a category row without a label (no label column, or a blank "
                          "cell outside --contextual-categories): none (no binary loss; default); unsafe; or unsafe "
                          "except --contextual-categories (no binary label)."},
    )
    contextual_categories: list[str] = field(
        default_factory=lambda: list(CONTEXTUAL_CATEGORIES),
        metadata={"help": "Categories a safe assistant may answer with care (S5 Specialized Advice): no binary label "
                          "under --category-rows-binary unsafe_except_contextual, and outside the rows the category "
                          "route's recall is chosen on (--category-route-recall)."},
    )
    safe_rows_category_negatives: bool = field(
        default=True,
        metadata={"help": "Safe rows of the main source (and safe rows without a category of the other sources) "
                          "also teach every category 0, and category scores are "
                          "reported as the head gives them (false: they add no category loss, and a category's "
                          "score is its sigmoid times P(unsafe))."},
    )

    def __post_init__(self) -> None:
        # --validation-fraction is checked where the split is carved (`data.load_splits`), before any model loads.
        require(self.max_train_samples is None or self.max_train_samples >= 1,
                 f"--max-train-samples must be at least 1, not {self.max_train_samples}")
        require(_positive(self.train_file_weight), f"--train-file-weight must be above 0, not {self.train_file_weight}")
        require(self.train_file_weight == 1.0 or self.extra_train_sources, "--train-file-weight weighs the main "
                "source against --extra-train-sources; alone it would only lengthen the epoch (use --epochs)")
        require(math.isfinite(self.source_prior_offsets) and 0 <= self.source_prior_offsets <= 1,
                f"--source-prior-offsets must be between 0 and 1, not {self.source_prior_offsets}")
        require(self.source_prior_offsets == 0 or self.extra_train_sources,
                "--source-prior-offsets sets the sources' priors apart: it needs --extra-train-sources")


@dataclass
class RunArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Where the classifier lands; runs/<strategy> if unset."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate, above 0; unset: {FULL_LAYERS_LEARNING_RATE:g} top-N, "
                          f"{ADAPTER_LEARNING_RATE:g} LoRA/QLoRA at rank {ADAPTER_SEARCHED_RANK} or less, and "
                          f"{ADAPTER_LEARNING_RATE:g} x sqrt({ADAPTER_SEARCHED_RANK} / r) above."},
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the classification head, above 0; it starts from random weights and "
                          f"so needs a larger one than the pretrained weights; unset: {HEAD_LEARNING_RATE:g}, or "
                          f"{CATEGORY_HEAD_LEARNING_RATE:g} where a category head is trained."},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Training rows per device per step (length-grouped, the loss averaged over each batch); "
                          f"unset: {DEFAULT_BATCH_ROWS}, or batches that fill --max-batch-tokens where that is given."},
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps accumulated per optimizer update."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_fraction: float = field(default=0.05, metadata={"help": "Share of the steps spent warming up the learning rate."})
    seed: int = field(default=42, metadata={"help": "Seed for the split (unless --split-seed), head initialisation, data order."})
    split_seed: int | None = field(default=None, metadata={"help": "Seed for the data alone: the validation split, "
        "cap=, weight= and refusals= rows (unset: --seed); runs that share it score the same validation rows."})
    class_weights: Literal["balanced", "sqrt", "none"] = field(
        default="balanced",
        metadata={"help": "Cross-entropy weights of the two classes: balanced (inverse frequency), sqrt (its square "
                          "root, half-way), none."},
    )
    class_weights_rows: Literal["all", "main_source"] = field(
        default="all",
        metadata={"help": "Which training rows --class-weights are computed from: all rows with a binary label, or "
                          "only the main source's (--train-file), so that a further source of unsafe prompts does "
                          "not lower the weight of the main source's unsafe rows."},
    )
    category_loss_weight: float = field(
        default=8.0,
        metadata={"help": "Weight of a category row's loss (the mean binary cross-entropy over categories) against the "
                          "safe/unsafe cross-entropy, 0 or more; only with a category head."},
    )
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "true/false: recompute activations to save memory; on by default for QLoRA only."})
    max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Token budget of one scoring batch (rows x longest row; unset: the device's scoring budget); "
                          "given, and without --batch-size, training batches fill it too (faster, but row batches "
                          "score better on validation)."},
    )
    merge: bool = field(default=False, metadata={"help": "Also write OUTPUT_DIR/merged: adapters merged into full weights."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep OUTPUT_DIR/checkpoints after a successful run."})
    resume: bool = field(
        default=True,
        metadata={"help": "Continue from the last complete checkpoint in OUTPUT_DIR/checkpoints (--no-resume: start over)."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many steps."})
    calibration: Literal["platt", "temperature", "none"] = field(
        default="platt",
        metadata={"help": "Calibrate P(unsafe) on the validation logits: platt = sigmoid(a*margin + b) (removes the "
                          "class weights' shift), temperature = b fixed at 0, none = softmax as trained."},
    )
    threshold_for_precision: float | None = field(
        default=None,
        metadata={"help": "Decision threshold: the one reaching this validation precision with the highest recall "
                          "(default: max validation F1)."},
    )
    threshold_for_recall: float | None = field(
        default=None,
        metadata={"help": "Decision threshold: the one reaching this validation recall with the highest precision."},
    )
    category_route_recall: float = field(
        default=0.9,
        metadata={"help": "With a category head: where the decision threshold catches fewer than this share of the "
                          "harmful category validation rows (all but --contextual-categories), also call a text "
                          "unsafe when its largest category score reaches a second threshold, one that "
                          "reaches this share (stored as category_route_threshold); 0: never."},
    )

    def __post_init__(self) -> None:
        require(_positive(self.epochs), f"--epochs must be above 0, not {self.epochs}")
        require(_positive(self.learning_rate), f"--learning-rate must be above 0, not {self.learning_rate}")
        require(_positive(self.head_learning_rate),
                 f"--head-learning-rate must be above 0, not {self.head_learning_rate}")
        require(self.batch_size is None or self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}")
        require(self.gradient_accumulation_steps >= 1,
                 f"--gradient-accumulation-steps must be at least 1, not {self.gradient_accumulation_steps}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                 f"--weight-decay must be 0 or more, not {self.weight_decay}")
        # The Trainer reads a warm-up of 1 or more as a number of steps, not a share.
        require(0 <= self.warmup_fraction < 1, f"--warmup-fraction must be in [0, 1), not {self.warmup_fraction}")
        check_category_loss_weight(self.category_loss_weight)
        require(self.max_batch_tokens is None or self.max_batch_tokens >= 1,
                 f"--max-batch-tokens must be at least 1, not {self.max_batch_tokens}")
        require(self.logging_steps >= 1, f"--logging-steps must be at least 1, not {self.logging_steps}")
        check_threshold_targets(self.threshold_for_precision, self.threshold_for_recall)
        require(0.0 <= self.category_route_recall <= 1.0,
                 f"--category-route-recall must be in [0, 1] (0: no route), got {self.category_route_recall}")


@dataclass
class PrefixCacheArguments:
    cache_prefix: bool = field(
        default=True,
        metadata={"help": "Run the frozen blocks below the trained ones once and train on their cached hidden states "
                          "(top-N, and LoRA with --lora-layers top:K; --no-cache-prefix: run the whole network every "
                          "step)."},
    )
    prefix_cache_max_mb: int = field(default=4096, metadata={
        "help": "Memory allowed for the cached hidden states; above it, training runs uncached."})
    prefix_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Keep the cached hidden states in this directory, keyed by the frozen weights and each row's "
                          "tokens, so that later runs over the same rows (another recipe, mixture or seed; a resumed "
                          "run) read them instead of running the frozen blocks again."},
    )

    def __post_init__(self) -> None:
        require(self.prefix_cache_max_mb >= 0, f"--prefix-cache-max-mb must be 0 or more, not {self.prefix_cache_max_mb}")
        require(self.prefix_cache_dir is None or self.cache_prefix,
                "--prefix-cache-dir keeps the prefix cache: it cannot go with --no-cache-prefix")
        require(self.prefix_cache_dir is None or not Path(self.prefix_cache_dir).is_file(),
                f"--prefix-cache-dir {self.prefix_cache_dir} is a file, not a directory")


@dataclass
class FullLayersArguments(PrefixCacheArguments):
    num_layers: int = field(default=2, metadata={
        "help": "Transformer blocks trained from the top (0 = head only); the rest stay frozen."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # The upper bound of --num-layers is the model's depth, checked when the model is built.
        require(self.num_layers >= 0, f"--num-layers must be 0 or more, not {self.num_layers}")


@dataclass
class LoraArguments(PrefixCacheArguments):
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA path's input; 0 by default: it copies every adapted layer's input, "
                          "which slows a training step, and did not help on validation."},
    )
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt; default: every linear layer inside the blocks."})
    use_rslora: bool = field(default=False, metadata={
        "help": "Rank-stabilised LoRA: scale the adapters by alpha / sqrt(r) instead of alpha / r."})
    lora_layers: str = field(
        default="all",
        metadata={"help": "Blocks that get adapters: all, or top:K (the top K blocks; the frozen blocks below them "
                          "then run once, cached, and every step runs only the top K, the norm and the head)."},
    )
    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lora_r >= 1, f"--lora-r must be at least 1, not {self.lora_r}")
        require(self.lora_alpha > 0, f"--lora-alpha must be above 0, not {self.lora_alpha}")
        require(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        parse_lora_layers(self.lora_layers)  # its upper bound, the model's depth, is checked when the model is built

    @property
    def adapted_top_layers(self) -> int | None:
        """K of --lora-layers top:K; None: adapters on every block."""
        return parse_lora_layers(self.lora_layers)


def parse_lora_layers(spec: str) -> int | None:
    """--lora-layers: "all" is None, "top:K" is K (at least 1); anything else is refused."""
    if spec == "all":
        return None
    match = re.fullmatch(r"top:([0-9]+)", spec)
    require(match is not None and int(match.group(1)) >= 1,
             f"--lora-layers must be all or top:K with K a whole number of at least 1, not {spec!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune: what its script says it does, its own arguments, its default learning rate."""

    name: str
    description: str
    arguments: type
    learning_rate: float
    searched_lora_rank: int | None = None  # the rank `learning_rate` was chosen at (adapter strategies)


STRATEGIES = {strategy.name: strategy for strategy in (
    Strategy("full_layers", "Fine-tune the top N transformer blocks and a classification head; the rest stays frozen.",
             FullLayersArguments, FULL_LAYERS_LEARNING_RATE),
    Strategy("lora", "Fine-tune LoRA adapters on every linear layer of the blocks (or of the top K: --lora-layers "
                     "top:K, over a cached frozen prefix), and a classification head.",
             LoraArguments, ADAPTER_LEARNING_RATE, searched_lora_rank=ADAPTER_SEARCHED_RANK),
    Strategy("qlora", "Fine-tune LoRA adapters on a 4-bit NF4 backbone (bitsandbytes), and a classification head.",
             LoraArguments, ADAPTER_LEARNING_RATE, searched_lora_rank=ADAPTER_SEARCHED_RANK),
)}


def default_learning_rate(strategy: str, lora_r: int | None = None) -> float:
    """The strategy's learning rate, lowered by sqrt(searched rank / r) for adapters of a higher rank.

    At a fixed alpha / r an adapter's update grows with its rank (the rsLoRA analysis), so a higher
    rank takes a lower rate; ranks below the searched one keep its rate, a higher one untried there.
    """
    record = STRATEGIES[strategy]
    if record.searched_lora_rank is None or lora_r is None or lora_r <= record.searched_lora_rank:
        return record.learning_rate
    return record.learning_rate * math.sqrt(record.searched_lora_rank / lora_r)


def default_head_learning_rate(trains_categories: bool) -> float:
    return CATEGORY_HEAD_LEARNING_RATE if trains_categories else HEAD_LEARNING_RATE


def check_category_loss_weight(weight: float) -> None:
    require(math.isfinite(weight) and weight >= 0, f"--category-loss-weight must be a finite number >= 0, not {weight}")


@dataclass
class TrainingPlan:
    """Everything one training run needs, gathered from the parsed arguments of a script, with the
    defaults that depend on several arguments decided."""

    strategy: str
    model: ModelArguments
    data: DataArguments
    run: RunArguments
    full_layers: FullLayersArguments | None = None
    lora: LoraArguments | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.strategy}")

    @property
    def learning_rate(self) -> float:
        if self.run.learning_rate is not None:
            return self.run.learning_rate
        return default_learning_rate(self.strategy, self.lora.lora_r if self.lora else None)

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

    @property
    def cached_top_layers(self) -> int | None:
        """The blocks trained over the cached frozen prefix (`prefix_cache.py`): top-N's N, or K of LoRA's
        --lora-layers top:K; None where every step runs the whole network."""
        if self.full_layers is not None and self.full_layers.cache_prefix:
            return self.full_layers.num_layers
        if self.lora is not None and self.lora.cache_prefix:
            return self.lora.adapted_top_layers
        return None

    @property
    def prefix_cache_max_bytes(self) -> int:
        options = self.full_layers if self.full_layers is not None else self.lora
        return (options.prefix_cache_max_mb if options is not None else 0) * 2**20

    @property
    def prefix_cache_dir(self) -> str | None:
        options = self.full_layers if self.full_layers is not None else self.lora
        return options.prefix_cache_dir if options is not None else None

    @property
    def category_score_rule(self) -> str:
        """"joint" unless safe rows taught the head "no category" (`categories.py` says why)."""
        return "conditional" if self.data.safe_rows_category_negatives else "joint"

    def arguments_record(self) -> dict:
        """Every argument, with the defaults decided here in place of the unset ones."""
        record = {"strategy": self.strategy}
        for part in (self.model, self.data, self.run, self.full_layers, self.lora):
            if part is not None:
                record.update(dataclasses.asdict(part))
        record["learning_rate"] = self.learning_rate
        record["head_learning_rate"] = self.head_learning_rate
        record["batch_size"] = self.batch_rows
        record["gradient_checkpointing"] = self.gradient_checkpointing
        return record


class ArgumentError(SafetyClassifierError, ValueError):
    """A command-line value out of its range: refused when parsed, so that nothing loads for nothing."""


@dataclass
class ClassifierLoadingArguments:
    """A saved classifier, how it is loaded and how it scores: what infer.py and serve.py share."""

    model_dir: str = field(metadata={"help": "A classifier directory written by a train_*.py script."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ...; default: cuda if present."})
    dtype: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={"help": "Compute dtype for scoring."})
    base_model: str | None = field(default=None, metadata={"help": "Override the adapter's base model (e.g. a local copy)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the base model."})
    threshold: float | None = field(
        default=None,
        metadata={"help": "Override the stored decision thresholds, of prompts and answers alike (on the calibrated "
                          "P(unsafe))."},
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Padded tokens (rows x longest row) of one forward pass; 2048 on CPU, 16384 on GPU."},
    )

    def __post_init__(self) -> None:
        require(self.threshold is None or 0.0 <= self.threshold <= 1.0,
                 f"--threshold must be between 0 and 1, not {self.threshold}")
        require(self.max_batch_tokens is None or self.max_batch_tokens >= 1,
                 f"--max-batch-tokens must be at least 1, not {self.max_batch_tokens}")


@dataclass
class InferenceArguments(ClassifierLoadingArguments):
    examples: list[str] | None = field(default=None, metadata={"help": "Prompts to score, given inline."})
    responses: list[str] | None = field(
        default=None,
        metadata={"help": "AI answers to judge, one per --examples prompt, in the same order: each verdict is then "
                          "about the answer, read with the prompt it answers."},
    )
    input_file: str | None = field(default=None, metadata={"help": "Prompts to score: .txt (one a line), CSV or JSONL."})
    text_column: str = field(default="user_input", metadata={"help": "Prompt column of --input-file (CSV/JSONL)."})
    response_column: str | None = field(
        default=None,
        metadata={"help": "Answer column of --input-file (CSV/JSONL): each row's answer is judged with its prompt. "
                          "A blank cell is an empty answer: safe, with probability 0.0."},
    )
    label_column: str | None = field(default=None, metadata={"help": "Label column of --input-file: also print metrics."})
    metrics_out: str | None = field(default=None, metadata={"help": "Write the metrics (with --label-column) to this JSON file."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object per prompt."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.responses is not None:
            require(self.examples is not None, "--responses needs --examples: one answer per prompt given inline "
                                                "(for a file, use --response-column)")
            require(len(self.responses) == len(self.examples),
                     f"--responses gives {len(self.responses)} answer(s) for {len(self.examples)} --examples "
                     "prompt(s): give exactly one answer per prompt, in the same order")
        require(self.response_column is None or self.input_file is not None,
                 "--response-column needs --input-file (for prompts given inline, use --responses)")
