"""Building the classifier: backbone + linear head on the last non-pad token, for each strategy.

All three strategies start from `AutoModelForSequenceClassification`, which reads the hidden
state of the last non-pad token of each row and projects it to the two classes (and, with a
category head, to one output per category: `labels.py`).
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from .arguments import STRATEGIES, ArgumentError
from .errors import ModelLoadError
from .labels import BINARY, LabelSchema

ID2LABEL = BINARY.id2label
HEAD_NAMES = ("score", "classifier")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "norm_f", "final_layer_norm")


def _read_cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_instructions() -> str | None:
    """The CPU's native bf16 matrix instructions ("AMX" or "AVX512-BF16"), None where it has neither."""
    flags = set()
    for line in _read_cpuinfo().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    return cpu_bf16_instructions() is not None


def cpu_model() -> str:
    """The CPU's model name (for reports: timings differ between machines with the same core count)."""
    for line in _read_cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_dtype(choice: str, device: torch.device | str | None = None) -> torch.dtype:
    """`auto` picks bf16 where the hardware computes it natively, fp32 elsewhere."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if choice != "auto":
        raise ValueError(f"--dtype must be auto, bf16 or fp32, not {choice!r}")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32


def describe_dtype(choice: str, device: torch.device | str | None = None) -> str:
    """The dtype `resolve_dtype(choice, device)` gives, the hardware and why, for start-up lines:
    "float32 (AMD EPYC 7B13: no native bf16)", "bfloat16 (Intel Xeon ...: native bf16 (AMX))"."""
    dtype = resolve_dtype(choice, device)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
        native = "native bf16" if torch.cuda.is_bf16_supported() else "no native bf16"
    else:
        hardware = cpu_model()
        native = "no native bf16"
        if cpu_supports_bf16():
            instructions = cpu_bf16_instructions()
            native = f"native bf16 ({instructions})" if instructions else "native bf16"
    name = str(dtype).removeprefix("torch.")
    # An explicit --dtype wins over the hardware, which is still named: bf16 without native support is slow.
    return f"{name} ({hardware}: {native})" if choice == "auto" else f"{name} (--dtype {choice}; {hardware}: {native})"


def dtype_name(model: nn.Module) -> str:
    """The dtype of a model's parameters as the command-line flags and reports spell it ("bfloat16")."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skip_cudnn_attention() -> None:
    """Keep PyTorch's SDPA off cuDNN attention on CUDA.

    cuDNN attention builds a plan for every new (batch, length) shape and keeps it in host memory
    for the process's life, so a server's memory grew with every new batch shape without end.
    Flash and memory-efficient attention keep no per-shape state, and serving was no slower
    without cuDNN.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer that pads on the right with a defined pad token.

    Right padding keeps every real token at the position it has unpadded, so a row scores the
    same alone and in a batch whatever the model does with position ids. Backbones without a
    pad token (Llama 3, some Phi releases) reuse unk or eos: the head reads the last non-pad
    token, and padding is masked out of attention, so no new embedding row is needed.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a tokenizer from {model_path!r}: {error}") from error
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ModelLoadError(f"the tokenizer of {model_path!r} has no pad, unk or eos token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def nf4_quantization_config():
    """4-bit NF4 with double quantisation and bf16 compute; the head stays in full precision."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(HEAD_NAMES),
    )


def load_sequence_classifier(
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    quantize_4bit: bool = False,
    schema: LabelSchema = BINARY,
) -> nn.Module:
    """The backbone with a fresh head of `schema.num_labels` outputs, labels named, pad token id set."""
    skip_cudnn_attention()
    kwargs = {}
    if quantize_4bit:
        from accelerate import PartialState

        kwargs["quantization_config"] = nf4_quantization_config()
        # bitsandbytes quantises as weights reach their device; each DDP rank takes its own GPU.
        kwargs["device_map"] = {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=schema.num_labels,
            id2label=schema.id2label,
            label2id=schema.label2id,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=_has_safetensors(model_path),
            # A saved classifier's head of another size (a binary one, now trained with categories) starts
            # afresh; any other weight of the wrong size is refused below.
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {model_path!r} for sequence classification: {error}") from error
    head = find_head_name(model)
    mismatched_keys = sorted(loading["mismatched_keys"])
    mismatched = "; ".join(f"{name} {tuple(saved)} (this model: {tuple(wanted)})"
                           for name, saved, wanted in mismatched_keys)
    if any(not name.startswith(f"{head}.") for name, _, _ in mismatched_keys):
        raise ModelLoadError(f"cannot load model {model_path!r}: weights of the wrong size: {mismatched}")
    if mismatched_keys:
        warnings.warn(f"{model_path} has a classification head of another size ({mismatched}); it is "
                      f"replaced by a new head of {schema.num_labels} outputs", stacklevel=2)
    rows = model.get_input_embeddings().num_embeddings
    if not 0 <= tokenizer.pad_token_id < rows:
        raise ModelLoadError(
            f"the pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}) is outside the embedding table "
            f"of {model_path!r} ({rows} rows); give the tokenizer a pad token from its vocabulary"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _has_safetensors(model_path: str) -> bool | None:
    """For a local directory, demand safetensors (no pickle loading); hub ids are left to the hub."""
    path = Path(model_path)
    if not path.is_dir():
        return None
    if any(path.glob("*.safetensors")):
        return True
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ModelLoadError(
            f"{path} holds only pickle weights (*.bin / *.pt), which can run code when loaded; "
            f"convert them to safetensors first"
        )
    return True


def find_transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList with one entry per hidden layer."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = getattr(config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ModelLoadError(
        f"cannot find the {num_layers} transformer blocks of {type(model).__name__}; "
        f"use train_lora.py with --target-modules for this architecture"
    )


def find_final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(its attribute name on the backbone, the module) of the norm after the last block; None
    if the backbone has none. The name lets prefix caching swap the norm out and back."""
    backbone = model.base_model
    for name in _FINAL_NORM_NAMES:
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return name, module
    return None


def find_head_name(model: nn.Module) -> str:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ModelLoadError(f"cannot find the classification head of {type(model).__name__} (looked for {HEAD_NAMES})")


def trainable_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classification head's trainable parameters (for a PEFT model: its trained copy of the head)."""
    head = find_head_name(model)
    return [parameter for name, parameter in model.named_parameters()
            if parameter.requires_grad and (name.startswith(f"{head}.") or f".{head}." in name)]


def linear_module_names_in_blocks(model: nn.Module) -> list[str]:
    """Short names of every linear layer inside the transformer blocks (fused ones included)."""
    blocks = find_transformer_blocks(model)
    names = set()
    for name, module in blocks.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def upcast_trainable_parameters(model: nn.Module) -> None:
    """Trainable weights live in fp32 (the optimizer's master copy); frozen ones keep the load dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def freeze_all_but_top_layers(model: nn.Module, num_layers: int) -> None:
    """Train only the top `num_layers` blocks, the final norm (when a block is trained) and the head."""
    blocks = find_transformer_blocks(model)
    if not 0 <= num_layers <= len(blocks):
        raise ValueError(f"--num-layers must be between 0 and {len(blocks)} for this model, not {num_layers}")
    model.requires_grad_(False)
    trained: list[nn.Module] = [getattr(model, find_head_name(model))]
    if num_layers > 0:
        trained.extend(blocks[len(blocks) - num_layers :])
        final_norm = find_final_norm(model)
        if final_norm is not None:
            trained.append(final_norm[1])
    for module in trained:
        module.requires_grad_(True)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None
    rslora: bool = False
    top_layers: int | None = None  # adapters on the top K blocks only (None: on every block)


def _top_blocks_selection(model: nn.Module, count: int) -> dict:
    """`LoraConfig` arguments that put adapters on the top `count` blocks only."""
    blocks = find_transformer_blocks(model)
    if not 1 <= count <= len(blocks):
        raise ArgumentError(f"--lora-layers top:{count} asks for more blocks than {type(model).__name__} has "
                            f"({len(blocks)}): give top:1 to top:{len(blocks)}, or all")
    path = next(name for name, module in model.named_modules() if module is blocks)
    return {"layers_to_transform": list(range(len(blocks) - count, len(blocks))),
            "layers_pattern": path.rsplit(".", 1)[-1]}


def _check_adapters_in_top_blocks(model: nn.Module, count: int) -> None:
    """Every adapter inside the top `count` blocks: one below them (a --target-modules full name, the
    embeddings) would change the frozen prefix that training computes once."""
    from peft.tuners.lora import LoraLayer

    blocks = find_transformer_blocks(model)
    top = {id(module) for block in list(blocks)[len(blocks) - count:] for module in block.modules()}
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    outside = [name for name, module in adapted if id(module) not in top]
    if not adapted or outside:
        raise ArgumentError(f"--lora-layers top:{count} needs adapters in the top {count} block(s) only; "
                            + (f"--target-modules also adapts {', '.join(outside[:4])}" if outside
                               else "--target-modules matches no layer there"))


def add_lora_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    targets = settings.target_modules or linear_module_names_in_blocks(model)
    selection = _top_blocks_selection(model, settings.top_layers) if settings.top_layers is not None else {}
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_rslora=settings.rslora,
        modules_to_save=[find_head_name(model)],
        **selection,
    )
    try:
        adapted = get_peft_model(model, config)
    except ValueError as error:
        raise ModelLoadError(f"cannot add LoRA adapters to {targets}: {error}") from error
    if settings.top_layers is not None:
        _check_adapters_in_top_blocks(adapted, settings.top_layers)
    return adapted


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT model (adapters injected in place), else `model` itself."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if get_base_model is not None else model


def build_model(
    strategy: str,
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    *,
    num_layers: int = 2,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    schema: LabelSchema = BINARY,
) -> nn.Module:
    """The trainable classifier for one strategy: full_layers, lora or qlora."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {tuple(STRATEGIES)}")
    quantize = strategy == "qlora"
    model = load_sequence_classifier(model_path, tokenizer, dtype, trust_remote_code, quantize_4bit=quantize,
                                     schema=schema)
    if strategy == "full_layers":
        freeze_all_but_top_layers(model, num_layers)
    else:
        if quantize:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        model = add_lora_adapters(model, lora or LoraSettings())
    upcast_trainable_parameters(model)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the values they hold, not packed bytes."""
    trainable = total = 0
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        count = quant_state.shape.numel() if quant_state is not None else parameter.numel()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
