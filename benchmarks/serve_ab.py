"""Two serve.py settings compared inside one run: two servers on 127.0.0.1, the load test's segments
alternating between them, each segment's prompts also scored offline right before or right after
it (as benchmarks/load_test.py does), so that this machine's drift weighs on both settings alike.
Server A gets `--a-flags`, server B `--b-flags`; A serves segments 1, 4, 5, 8, 9, ... and B the
others, so that each is served first and offline first equally often. The last lines are one JSON
object per server: served/offline ratio overall and by segment, mean batch size, answers 200.

    python benchmarks/serve_ab.py --model-dir runs/demo-lora --a-flags "--return-wait-share 0" \\
        --b-flags "--return-wait-share 0.05"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import subprocess
import sys
import time

import httpx
from load_test import (
    DEFAULT_DATA,
    REPO_ROOT,
    free_port,
    metric_value,
    offline_first,
    request_plan,
    segment_order,
    send_all,
    wait_until_ready,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--a-flags", default="", help="serve.py flags of server A")
    parser.add_argument("--b-flags", default="", help="serve.py flags of server B")
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--segments", type=int, default=12, help="a multiple of 4 balances the order")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--data-file", default=str(DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    prompts, _, plan, order = request_plan(args.data_file, args.requests, args.bad_fraction, 64, args.seed)
    segments = segment_order(len(order), args.segments)

    from safety_classifier.console import quiet_library_noise
    from safety_classifier.inference import load_classifier

    quiet_library_noise()
    classifier = load_classifier(args.model_dir)
    classifier.scores(prompts, show_progress=False)  # untimed: builds every shape's kernels, as the servers' warm-up

    def offline_segment(positions) -> float:
        texts = [prompts[order[p]] for p in positions if order[p] < len(prompts)]
        started = time.perf_counter()
        classifier.scores(texts, show_progress=False)
        return time.perf_counter() - started

    servers, urls = {}, {}
    for name, flags in (("A", args.a_flags), ("B", args.b_flags)):
        port = free_port()
        urls[name] = f"http://127.0.0.1:{port}"
        servers[name] = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--model-dir", args.model_dir,
                                          "--port", str(port), "--max-inputs", "64", "--log-level", "warning",
                                          *shlex.split(flags)], cwd=REPO_ROOT)
    try:
        for name, server in servers.items():
            wait_until_ready(urls[name], server, 600)
        before = {name: httpx.get(f"{url}/metrics", timeout=10).text for name, url in urls.items()}
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        answered = dict.fromkeys(servers, 0)
        for number, positions in enumerate(segments):
            name = "A" if number % 4 in (0, 3) else "B"
            offline_s = offline_segment(positions) if offline_first(number) else None
            started = time.perf_counter()
            results = asyncio.run(send_all(urls[name], [plan[order[p]] for p in positions], args.concurrency))
            served_s = time.perf_counter() - started
            offline_s = offline_s if offline_s is not None else offline_segment(positions)
            timings[name].append((served_s, offline_s))
            answered[name] += sum(result["status"] == 200 for result in results)
            print(f"segment {number + 1}/{len(segments)}, server {name}: served {served_s:.1f} s, offline "
                  f"{offline_s:.1f} s ({offline_s / served_s:.2f})", flush=True)
        after = {name: httpx.get(f"{url}/metrics", timeout=10).text for name, url in urls.items()}
    finally:
        for server in servers.values():
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    for name, flags in (("A", args.a_flags), ("B", args.b_flags)):
        batches, texts = (metric_value(after[name], metric) - metric_value(before[name], metric)
                          for metric in ("moderation_batch_size_count", "moderation_batch_size_sum"))
        served, offline = zip(*timings[name])
        print(json.dumps({"server": name, "flags": flags, "served_vs_offline_ratio": round(sum(offline) / sum(served), 3),
                          "by_segment": [round(o / s, 3) for s, o in timings[name]],
                          "mean_batch_size": round(texts / batches, 2) if batches else 0.0, "answered_200": answered[name]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
