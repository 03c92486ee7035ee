"""Command-line arguments as dataclasses, parsed by `transformers.HfArgumentParser`.

Each field becomes `--field-name` (and `--field_name`); a boolean defaulting to True also gets
`--no-field-name`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .embedded import EMBEDDED_ALIAS
from .labels import CONTEXTUAL_CATEGORIES


@dataclass
class ModelArguments:
    model: str = field(
        default=EMBEDDED_ALIAS,
        metadata={"help": f"Hub id, local directory, or '{EMBEDDED_ALIAS}' (the embedded default, no hub needed)."},
    )
    dtype: Literal["auto", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "Weights/compute dtype; auto = bf16 where the hardware has it, else fp32."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code shipped with the model repository. Off unless asked for."}
    )
    max_length: int = field(default=1024, metadata={"help": "Truncate prompts to this many tokens (never pads)."})
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Read each text in a template, stored with the classifier: 'chat' (the tokenizer's chat "
                          "template, the text as the user's turn, then the assistant's turn begins) or a string with "
                          "one {text}. Default: the text as it is."},
    )


@dataclass
class DataArguments:
    dataset: str = field(default="lmsys/toxic-chat", metadata={"help": "Hub data set, used when no --train-file."})
    dataset_config: str = field(default="toxicchat0124", metadata={"help": "Configuration of --dataset."})
    train_file: str | None = field(default=None, metadata={"help": "CSV, JSONL, JSON or Parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file; else carved from train."})
    test_file: str | None = field(default=None, metadata={"help": "Test file, scored once at the end."})
    text_column: str = field(default="user_input", metadata={"help": "Column holding the prompt."})
    label_column: str = field(default="toxicity", metadata={"help": "Column holding 0 (safe) / 1 (unsafe)."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Stratified share of train held out for validation when no file is given."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a stratified subset this size."})
    extra_train_sources: list[str] | None = field(
        default=None,
        metadata={"help": "Further training sources, each 'FILE,text=COLUMN[,label=COLUMN][,category=COLUMN]"
                          "[,weight=W][,validation=F]'; a category column adds a category head (README, Categories)."},
    )
    taxonomy: str | None = field(
        default=None,
        metadata={"help": "JSON {code: name} or CSV (code,name) naming the categories; codes outside it are refused. "
                          "Default: the project's S1-S12 names, other codes named by themselves."},
    )
    # Category rows teach categories only, safe main-source rows "no category", and the category head
    # is a second route to unsafe (--category-route-recall): on validation the main source's rows
    # reach AUPRC 0.841 against 0.799 with unsafe category rows, at the same category macro F1
    # and an unsafe recall over 0.90 on the category rows (README, *Category search*).
    category_rows_binary: Literal["unsafe", "unsafe_except_contextual", "unlabelled"] = field(
        default="unlabelled",
        metadata={"help": "The safe/unsafe label of a category row without a label column: none (no binary loss; "
                          "default); unsafe; or unsafe except --contextual-categories (no binary label)."},
    )
    contextual_categories: list[str] = field(
        default_factory=lambda: list(CONTEXTUAL_CATEGORIES),
        metadata={"help": "Categories a safe assistant may answer with care (S5 Specialized Advice): no binary label "
                          "under --category-rows-binary unsafe_except_contextual, and outside the rows the category "
                          "route's recall is chosen on (--category-route-recall)."},
    )
    safe_rows_category_negatives: bool = field(
        default=True,
        metadata={"help": "Safe rows of the main source also teach every category 0, and category scores are "
                          "reported as the head gives them (false: they add no category loss, and a category's "
                          "score is its sigmoid times P(unsafe), see README's *What a category score is*)."},
    )


@dataclass
class RunArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Where the classifier lands; runs/<strategy> if unset."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate; unset: 3e-4 top-N, 4e-4 LoRA/QLoRA at rank 16 or less and "
                          "4e-4 x sqrt(16 / r) above (2e-4 at r=64; chosen on validation with batches of 8 rows; "
                          "README, the recipe search)."},
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the classification head, which starts from random weights and so "
                          "needs a larger one than the pretrained weights; unset: 1e-3, or 3e-3 where a category head "
                          "is trained (README, Harm categories)."},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Training rows per device per step (length-grouped, the loss averaged over each batch); "
                          "unset: 8, or batches that fill --max-batch-tokens where that is given."},
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps accumulated per optimizer update."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_fraction: float = field(default=0.05, metadata={"help": "Share of the steps spent warming up the learning rate."})
    seed: int = field(default=42, metadata={"help": "Seed for the split, the head's initialisation and data order."})
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
                          "safe/unsafe cross-entropy; only with a category head. 8 was chosen on validation over 1 "
                          "and 4 (README, Category search)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "true/false: recompute activations to save memory; on by default for QLoRA only."}
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Token budget of one scoring batch (rows x longest row; 2048 on CPU, 16384 on GPU); given, "
                          "and without --batch-size, training batches fill it too (faster, but validation AUPRC "
                          "0.81 against 0.84 for 8-row batches: README, the recipe search)."},
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


@dataclass
class TopLayersArguments:
    num_layers: int = field(
        default=2, metadata={"help": "Transformer blocks trained from the top (0 = head only); the rest stay frozen."}
    )
    cache_prefix: bool = field(
        default=True,
        metadata={"help": "Run the frozen bottom of the network once and train the top on its cached hidden states "
                          "(--no-cache-prefix: run the whole network every step)."},
    )
    prefix_cache_max_mb: int = field(
        default=4096, metadata={"help": "Memory allowed for the cached hidden states; above it, training runs uncached."}
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA path's input; 0 by default: 0.05 made a CPU training step 28 %% "
                          "slower (a dropped-out copy of every adapted layer's input; README, Performance) and "
                          "validation AUPRC no better (0.813 against 0.811; README, the recipe search)."},
    )
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: every linear layer inside the blocks."}
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilised LoRA: scale the adapters by alpha / sqrt(r) instead of alpha / r."},
    )


@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune: what its script says it does, its own arguments, its default learning rate."""

    name: str
    description: str
    arguments: type
    learning_rate: float
    searched_lora_rank: int | None = None  # the rank `learning_rate` was chosen at (adapter strategies)

    def default_learning_rate(self, lora_rank: int | None = None) -> float:
        """`learning_rate`, lowered by sqrt(searched rank / r) for adapters of a higher rank.

        At a fixed alpha / r an adapter's update grows with its rank (the rsLoRA analysis): at 4e-4,
        QLoRA r=32 and LoRA r=64 scored below their 2e-4 runs on validation (README, the rate at
        higher ranks). Ranks below the searched one keep its rate (a higher one was not tried there).
        """
        if self.searched_lora_rank is None or lora_rank is None or lora_rank <= self.searched_lora_rank:
            return self.learning_rate
        return self.learning_rate * math.sqrt(self.searched_lora_rank / lora_rank)


# Learning rates chosen on the validation split with the default 8-row batches (README, the recipe
# search: LoRA r=16 reaches validation AUPRC 0.861 at 4e-4, against 0.845 at 2e-4, and 8e-4 is worse;
# token-budget batches, at any of the rates searched, stopped at 0.811-0.813), lowered above rank 16
# (`Strategy.default_learning_rate`). QLoRA takes LoRA's rate (the same adapters; not searched apart).
# Top-N: top-3 reaches 0.819-0.829 from 2e-4 to 1e-3, against 0.687 at 5e-5 (the rate before) and 0.796
# at 2e-3; 3e-4 (0.826) sits inside that plateau, well below where it falls.
STRATEGIES = {strategy.name: strategy for strategy in (
    Strategy("top_layers", "Fine-tune the top N transformer blocks and a classification head; the rest stays frozen.",
             TopLayersArguments, 3e-4),
    Strategy("lora", "Fine-tune LoRA adapters on every linear layer of the blocks, and a classification head.",
             LoraArguments, 4e-4, searched_lora_rank=16),
    Strategy("qlora", "Fine-tune LoRA adapters on a 4-bit NF4 backbone (bitsandbytes), and a classification head.",
             LoraArguments, 4e-4, searched_lora_rank=16),
)}
DEFAULT_BATCH_ROWS = 8  # training rows per device per step unless --batch-size or --max-batch-tokens says otherwise
HEAD_LEARNING_RATE = 1e-3
# With a category head: its outputs learn from the category rows alone, and under Adam a loss weight
# hardly speeds them up, their learning rate does (validation category macro F1 0.768 against 0.726,
# the ToxicChat rows' AUPRC 0.832 against 0.833; README, Harm categories).
CATEGORY_HEAD_LEARNING_RATE = 3e-3


def default_head_learning_rate(trains_categories: bool) -> float:
    return CATEGORY_HEAD_LEARNING_RATE if trains_categories else HEAD_LEARNING_RATE


@dataclass
class InferenceArguments:
    model_dir: str = field(metadata={"help": "A classifier directory written by a train_*.py script."})
    examples: list[str] | None = field(default=None, metadata={"help": "Prompts to score, given inline."})
    input_file: str | None = field(default=None, metadata={"help": "Prompts to score: .txt (one a line), CSV or JSONL."})
    text_column: str = field(default="user_input", metadata={"help": "Prompt column of --input-file (CSV/JSONL)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of --input-file: also print metrics."})
    metrics_out: str | None = field(default=None, metadata={"help": "Write the metrics (with --label-column) to this JSON file."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object per prompt."})
    threshold: float | None = field(
        default=None, metadata={"help": "Override the stored decision threshold (on the calibrated P(unsafe))."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ...; default: cuda if present."})
    dtype: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={"help": "Compute dtype for scoring."})
    max_batch_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of one scoring batch; 2048 on CPU, 16384 on GPU."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Override the adapter's base model reference (e.g. a local copy)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the base model."})
