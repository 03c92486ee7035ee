"""Host memory that a CUDA forward pass keeps per new input shape, and which attention kernel keeps it.

Phi-4-mini's shape (random init, 4 blocks instead of 32: a cache keyed on shapes fills the same per
block), bf16, SDPA. Each phase runs forward passes and prints how the process's anonymous RSS moved:
one shape repeated, 100 new (batch, length) shapes, the same 100 again, the MLP alone on 300 new
token counts, then new shapes with cuDNN attention switched off, then with the math kernel only.
Needs a CUDA GPU (run on an H100: results/attention-shape-memory-h100.txt):

    python benchmarks/attention_shape_memory.py
"""

import os
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_shapes import shape_config  # noqa: E402
from load_test import rss_parts_mb  # noqa: E402


def anonymous_rss_mib() -> float:
    parts = rss_parts_mb(os.getpid())
    if "RssAnon" not in parts:
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")
    return parts["RssAnon"]


def main() -> None:
    config = shape_config("phi-4-mini", False)
    config.num_hidden_layers, config.num_labels, config.pad_token_id = 4, 2, 0
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16).cuda().eval()
    print("attention", model.config._attn_implementation, flush=True)
    rng = random.Random(0)

    def forward(shapes: list[tuple[int, int]], padded: bool = True) -> None:
        with torch.inference_mode():
            for rows, length in shapes:
                ids = torch.randint(1, 1000, (rows, length), device="cuda")
                mask = torch.ones(rows, length, dtype=torch.long, device="cuda")
                if padded:
                    mask[0, : length // 2] = 0
                model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        torch.cuda.synchronize()

    def mlp(token_counts: list[int]) -> None:
        block = model.model.layers[0].mlp
        with torch.inference_mode():
            for count in token_counts:
                block(torch.randn(count, config.hidden_size, device="cuda", dtype=torch.bfloat16)).float().sum().item()
        torch.cuda.synchronize()

    def new_shapes(lengths: range) -> list[tuple[int, int]]:
        return [(rng.randint(1, 32), length) for length in lengths]

    def phase(name: str, run) -> None:
        before = anonymous_rss_mib()
        run()
        after = anonymous_rss_mib()
        print(f"{name}: RssAnon {before:.0f} -> {after:.0f} MiB ({after - before:+.1f})", flush=True)

    forward([(4, 64)])
    mlp([64])
    shapes = new_shapes(range(200, 300))
    phase("warm repeat of one shape x100", lambda: forward([(8, 100)] * 100))
    phase("100 new (batch, length) shapes, padded mask", lambda: forward(shapes))
    phase("the same 100 shapes again", lambda: forward(shapes))
    phase("100 new shapes, no padding", lambda: forward(new_shapes(range(300, 400)), padded=False))
    phase("MLP only, 300 new token counts", lambda: mlp(list(range(5000, 5300))))
    phase("MLP only, the same 300 again", lambda: mlp(list(range(5000, 5300))))
    torch.backends.cuda.enable_cudnn_sdp(False)
    phase("cuDNN SDPA off, 100 new shapes", lambda: forward(new_shapes(range(400, 500))))
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    phase("math SDPA only, 100 new shapes", lambda: forward(new_shapes(range(500, 600))))
    print(torch.__version__, "cuDNN", torch.backends.cudnn.version())


if __name__ == "__main__":
    main()
