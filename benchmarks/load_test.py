"""Load test of the moderation service (serve.py): throughput, latency, batching, memory, and correctness.

Starts serve.py on 127.0.0.1 (a subprocess), sends a bounded number of requests at a fixed
concurrency (asyncio + aiohttp): single ToxicChat prompts, with `--conversation-share` of them
conversations instead (a user's prompt and an assistant's answer, the answer judged), mixed with
malformed requests; with `--api-key` every request sends the key, and requests without it or with
a wrong one are checked to be refused. The
requests are cut into `--segments` consecutive segments, and each segment's prompts are also
scored offline in one `Classifier.scores` call (what infer.py does), right before or right after
the segment is served (alternately: offline-served, served-offline, ...), so that the machine's
drift (on shared machines up to 2x within minutes) weighs on both sides of the throughput ratio
alike; the ratio is total offline time over total served time, the same prompts on each side, and
each segment's own ratio shows how far one measurement can be trusted. In half precision the
offline side first scores every prompt once untimed (on CPU building the kernels of every shape,
as the server's warm-up does), and that pass against the segments' calls estimates how far a score
moves with its batch.
Checks that every good request got 200 with the offline scores (within --tolerance; P(unsafe) for
a binary classifier, each category's score for one with a category head), the offline verdict and
the text judged (a conversation's answer is scored offline as the same `PromptResponse`), and
every bad one a 4xx. Prints a table; the last line is one JSON object with every figure.

    python benchmarks/load_test.py --model-dir runs/demo-lora
    python benchmarks/load_test.py --model-dir runs/demo-lora --quick      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch
from load_requests import (  # benchmarks/ is on the path of a script run from it
    DEFAULT_CONVERSATIONS,
    DEFAULT_DATA,
    bad_requests,
    request_plan,
)

from safety_classifier.formatting import judged_part
from safety_classifier.serving.cli_args import API_KEY_ENVIRONMENT

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_COUNT = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="A classifier directory written by a train_*.py script.")
    parser.add_argument("--requests", type=int, default=None, help="Requests to send (default 2000; --quick: 40).")
    parser.add_argument("--concurrency", type=int, default=None, help="Requests in flight at once (default 32; --quick: 8).")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="Share of malformed requests.")
    parser.add_argument("--conversation-share", type=float, default=0.0,
                        help="Share of the good requests sent as a conversation (a user's prompt and an assistant's "
                             "answer, the answer judged) instead of a single prompt.")
    parser.add_argument("--conversation-file", default=str(DEFAULT_CONVERSATIONS),
                        help="CSV with prompt and response columns, the conversations' turns (built-in pairs if absent).")
    parser.add_argument("--api-key", default=None,
                        help=f"Start the server with this key (through {API_KEY_ENVIRONMENT}) and send it with every "
                             "request; requests without it and with a wrong one are then checked to get 401.")
    parser.add_argument("--data-file", default=str(DEFAULT_DATA),
                        help="CSV with a user_input column (built-in prompts if absent).")
    parser.add_argument("--device", default=None, help="Passed to the server and the offline scoring.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="Passed to the server.")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="Passed to the server.")
    parser.add_argument("--return-wait-share", type=float, default=None, help="Passed to the server.")
    parser.add_argument("--max-inputs", type=int, default=64,
                        help="Passed to the server; the too-many-inputs requests send one more.")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="Largest |served - offline| score accepted, or twice the largest difference between "
                             "the same prompts scored offline two ways if that is larger (in bf16 it is): in one call "
                             "and in served-size batches (the ceiling's prompts), and, in bf16, all prompts in one "
                             "call and in their segments' calls.")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="Seconds to wait for the server's /ready.")
    parser.add_argument("--ceiling-prompts", type=int, default=640,
                        help="Prompts scored offline both in one call and in batches of the served mean batch size, "
                             "to measure what batches that small allow (0: skip).")
    parser.add_argument("--segments", type=int, default=None,
                        help="Segments the requests are cut into, each timed served and offline back to back "
                             "(default 10; --quick: 2).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A tiny smoke run: 40 requests at concurrency 8.")
    args = parser.parse_args(argv)
    args.requests = args.requests or (40 if args.quick else 2000)
    args.concurrency = args.concurrency or (8 if args.quick else 32)
    args.segments = args.segments or (2 if args.quick else 10)
    if args.segments < 1:
        parser.error("--segments must be at least 1")
    if not 0.0 <= args.conversation_share <= 1.0:
        parser.error("--conversation-share must be between 0 and 1")
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def rss_parts_mb(pid: int) -> dict[str, float]:
    """RSS split as the kernel counts it (Linux): anonymous pages (the heap, tensors, CUDA's host buffers)
    against file-backed ones (shared libraries paged in, e.g. GPU kernels loaded lazily); {} elsewhere."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    parts = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "RssShmem"):
            parts[name] = round(int(value.split()[0]) / 1024, 1)
    return parts


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    command = [sys.executable, str(REPO_ROOT / "serve.py"), "--model-dir", args.model_dir, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", args.dtype, "--max-inputs", str(args.max_inputs), "--log-level", "warning"]
    for flag, value in (("--device", args.device), ("--max-batch-tokens", args.max_batch_tokens),
                        ("--max-wait-ms", args.max_wait_ms), ("--return-wait-share", args.return_wait_share)):
        if value is not None:
            command += [flag, str(value)]
    # The key through the environment, as a deployment would give it: not in the process list.
    environment = {key: value for key, value in os.environ.items() if key != API_KEY_ENVIRONMENT}
    if args.api_key:
        environment[API_KEY_ENVIRONMENT] = args.api_key
    return subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO_ROOT, env=environment)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread so far: in serve.py, the event loop's (HTTP, JSON, batching)."""
    import psutil

    return next((thread.user_time + thread.system_time for thread in psutil.Process(pid).threads() if thread.id == pid),
                0.0)


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float, headers: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"error: the server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=5, headers=headers).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"error: the server was not ready within {timeout:.0f} s")


def metric_value(text: str, name: str) -> float:
    """Sum of every sample of `name` (any labels) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class RssSampler:
    """The server's resident size once a second while the requests run, in a thread of this process
    (its peak; the size at the end of each segment is read when the segment ends)."""

    def __init__(self, pid: int, interval_s: float = 1.0):
        self.pid, self.interval_s = pid, interval_s
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.values.append(rss_mb(self.pid))
            except Exception:  # the server went away; its exit is checked elsewhere
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def send_all(url: str, requests: list[tuple[str, bytes]], concurrency: int,
                   api_key: str | None = None) -> list[dict]:
    """Each request once, `concurrency` at a time: status, latency and body of each, in request order.
    aiohttp, not httpx: the load generator shares the server's cores, and aiohttp's client takes 0.4 ms
    of CPU a request where httpx's takes 5 ms (benchmarks/client_cost.py)."""
    import aiohttp

    results: list[dict] = [{} for _ in requests]
    queue = iter(range(len(requests)))
    headers = {"content-type": "application/json", **auth_headers(api_key)}

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in queue:
            kind, body = requests[index]
            started = time.perf_counter()
            try:
                async with session.post("/v1/moderations", data=body, headers=headers) as response:
                    status, payload = response.status, json.loads(await response.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                status, payload = None, {"transport_error": repr(error)}
            results[index] = {"kind": kind, "status": status, "latency": time.perf_counter() - started, "body": payload}

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


def segment_order(count: int, segments: int) -> list[np.ndarray]:
    """Positions 0..count-1 cut into `segments` consecutive parts of near-equal size."""
    return [part for part in np.array_split(np.arange(count), min(segments, max(count, 1))) if len(part)]


def offline_first(segment: int) -> bool:
    """Offline-served, served-offline, offline-served, ...: each side goes first as often as the other,
    and two passes of the same side are back to back, so a drift within a pair weighs on both sides."""
    return segment % 2 == 0


def throughput_ratios(served_s: list[float], offline_s: list[float]) -> dict:
    """Served against offline throughput on the same prompts: overall (total offline time over total
    served time) and each segment's, with their spread."""
    per_segment = [offline / served for served, offline in zip(served_s, offline_s)]
    return {"served_vs_offline_ratio": round(sum(offline_s) / sum(served_s), 3),
            "served_vs_offline_by_segment": [round(ratio, 3) for ratio in per_segment],
            "served_vs_offline_median": round(float(np.median(per_segment)), 3),
            "served_vs_offline_range": [round(min(per_segment), 3), round(max(per_segment), 3)]}


def builds_kernels_per_shape(classifier) -> bool:
    """Half precision on CPU: oneDNN and SDPA build (and keep) kernels for every new input shape, so
    a first pass over a set of prompts is slower than the next."""
    from safety_classifier.packing import pack_token_multiple

    return pack_token_multiple(classifier.model) > 1


def scores_move_with_batch(classifier) -> bool:
    """In half precision, on any device, a prompt's score moves with the prompts it shares a pass with."""
    return next(classifier.model.parameters()).dtype in (torch.bfloat16, torch.float16)


def batch_size_ceiling(classifier, prompts: list[str], batch_size: int) -> dict:
    """Offline prompts/s on the same prompts in one call and in consecutive batches of the served
    mean size. Their ratio is what batches of that size allow on this machine, however good the
    server: padded, a few prompts of mixed lengths take more passes and more padding than all of
    them sorted by length (on CPU, packed rows avoid most of that: safety_classifier/packing.py).
    Timed one way, the other twice, the first again, so that a drift weighs on both alike; where
    kernels are built per shape, each way runs once untimed first, as the server warms up."""
    def one_call() -> np.ndarray:
        return classifier.unsafe_probabilities(prompts, show_progress=False)

    def batched() -> np.ndarray:
        return np.concatenate([classifier.unsafe_probabilities(prompts[start:start + batch_size], show_progress=False)
                               for start in range(0, len(prompts), batch_size)])

    ways = {"one_call": one_call, "batched": batched}
    if builds_kernels_per_shape(classifier):
        for score in ways.values():
            score()
    scores, seconds = {}, dict.fromkeys(ways, 0.0)
    for name in ("one_call", "batched", "batched", "one_call"):
        started = time.perf_counter()
        scores[name] = ways[name]()
        seconds[name] += time.perf_counter() - started
    return {"ceiling_prompts": len(prompts), "ceiling_batch_size": batch_size,
            "ceiling_one_call_prompts_per_s": round(2 * len(prompts) / seconds["one_call"], 2),
            "ceiling_batched_prompts_per_s": round(2 * len(prompts) / seconds["batched"], 2),
            "batch_size_ceiling": round(seconds["one_call"] / seconds["batched"], 3),
            # In half precision a prompt's score moves with the batch it is in (kernels, packing):
            # the served scores cannot match the offline ones more closely than the offline ones match each other.
            "offline_batch_difference": float(np.nanmax(np.abs(scores["one_call"] - scores["batched"]), initial=0.0))}


def offline_pass_difference(first_pass: np.ndarray, segment_calls: np.ndarray) -> dict:
    """The same prompts scored offline in one call and in their segments' calls: the largest score
    difference, and its 99.9th percentile to show how far the largest stands out."""
    differences = np.nanmax(np.abs(first_pass - segment_calls), axis=1)
    differences = differences[~np.isnan(differences)]
    return {"offline_pass_difference": float(differences.max(initial=0.0)),
            "offline_pass_difference_p999": float(np.percentile(differences, 99.9)) if len(differences) else 0.0}


def accepted_tolerance(floor: float, ceiling: dict, pass_difference: dict) -> float:
    """`--tolerance`, or twice the largest offline-against-offline difference measured, if larger."""
    measured = max(ceiling.get("offline_batch_difference", 0.0), pass_difference.get("offline_pass_difference", 0.0))
    return max(floor, 2 * measured)


def refused_without_the_key(url: str, api_key: str) -> bool:
    """Whether a moderation request without the key and one with a wrong key both get 401 with the
    OpenAI error body, and the server counted both refusals."""
    def refusals() -> float:
        exposition = httpx.get(f"{url}/metrics", timeout=10, headers=auth_headers(api_key)).text
        return metric_value(exposition, "moderation_auth_refusals_total")

    before = refusals()
    answers = [httpx.post(f"{url}/v1/moderations", json={"input": "hello"}, timeout=30, headers=headers)
               for headers in ({}, auth_headers(api_key + "-wrong"))]
    refused = all(answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
                  for answer in answers)
    return refused and refusals() - before == len(answers)


def check_answer(classifier, answer: dict, offline_row: np.ndarray, tolerance: float,
                 judged: str = "prompt") -> tuple[float, bool]:
    """A served moderation result against the offline `Classifier.scores` row of the same text: the
    largest score difference, and whether `flagged` differs from the offline verdict of its task
    (`judged`: an answer has a threshold of its own) where no score is within `tolerance` of a
    threshold it is compared with."""
    codes = classifier.category_codes
    served = np.array([answer["category_scores"][code] for code in codes] if codes
                      else [answer["category_scores"]["unsafe"]])
    difference = float(np.max(np.abs(served - (offline_row[1:] if codes else offline_row[:1]))))
    near_threshold = abs(offline_row[0] - classifier.threshold_for(judged)) <= tolerance
    if classifier.category_route_threshold is not None:
        near_threshold |= abs(offline_row[1:].max() - classifier.category_route_threshold) <= tolerance
    expected = classifier.verdict(offline_row, judged)["label"] == "unsafe"
    return difference, answer["flagged"] != expected and not near_threshold


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts, source, plan, order = request_plan(args.data_file, args.requests, args.bad_fraction, args.max_inputs,
                                                args.seed, args.conversation_share, args.conversation_file)
    expected_status = {kind: status for kind, _, status in bad_requests(args.max_inputs)}
    segments = segment_order(len(order), args.segments)

    # Offline, as infer.py scores: each segment's prompts in one call, same device and dtype.
    from safety_classifier.console import quiet_library_noise
    from safety_classifier.inference import load_classifier

    quiet_library_noise()
    classifier = load_classifier(args.model_dir, device=args.device, dtype=args.dtype)
    classifier.scores(prompts[:8], show_progress=False)  # warm-up, as the server's
    # In half precision, an untimed first pass over every prompt: on CPU it pays for building each
    # shape's kernels (in bf16: 39.5 prompts/s against 48.1 and 51.1 for the next two), as the
    # server's warm-up does, and on any device its scores against the segments' give the tolerance.
    offline_warm_up_s, first_pass = None, None
    if scores_move_with_batch(classifier):
        warm_up_started = time.perf_counter()
        first_pass = classifier.scores(prompts, show_progress=False)
        offline_warm_up_s = time.perf_counter() - warm_up_started

    offline = np.full((len(prompts), 1 + len(classifier.category_codes)), np.nan)  # Classifier.scores' columns

    def offline_segment(positions: np.ndarray) -> float:
        """Score the segment's good prompts offline in one call; the seconds it took."""
        indices = [order[position] for position in positions if order[position] < len(prompts)]
        offline_started = time.perf_counter()
        offline[indices] = classifier.scores([prompts[index] for index in indices], show_progress=False)
        return time.perf_counter() - offline_started

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"load_test_server_{port}.log"
    shuffled: list[dict] = []
    served_s, offline_s, rss_by_segment = [], [], []
    server_cpu = event_loop_cpu = client_cpu = 0.0
    with open(log_path, "w") as log:
        server = start_server(args, port, log)
        try:
            ready_s = wait_until_ready(url, server, args.ready_timeout, auth_headers(args.api_key))
            rss_start, rss_parts_start = rss_mb(server.pid), rss_parts_mb(server.pid)
            before = httpx.get(f"{url}/metrics", timeout=10, headers=auth_headers(args.api_key)).text
            with RssSampler(server.pid) as sampler:
                for number, positions in enumerate(segments):
                    if offline_first(number):
                        offline_s.append(offline_segment(positions))
                    server_cpu_start, client_cpu_start = cpu_seconds(server.pid), cpu_seconds(os.getpid())
                    event_loop_cpu_start = main_thread_cpu_seconds(server.pid)
                    segment_started = time.perf_counter()
                    shuffled += asyncio.run(send_all(url, [plan[order[p]] for p in positions], args.concurrency,
                                                     args.api_key))
                    served_s.append(time.perf_counter() - segment_started)
                    server_cpu += cpu_seconds(server.pid) - server_cpu_start
                    event_loop_cpu += main_thread_cpu_seconds(server.pid) - event_loop_cpu_start
                    client_cpu += cpu_seconds(os.getpid()) - client_cpu_start
                    rss_by_segment.append(round(rss_mb(server.pid), 1))
                    if not offline_first(number):
                        offline_s.append(offline_segment(positions))
                    print(f"segment {number + 1}/{len(segments)}: served {served_s[-1]:.1f} s, offline "
                          f"{offline_s[-1]:.1f} s ({offline_s[-1] / served_s[-1]:.2f})", file=sys.stderr, flush=True)
            after = httpx.get(f"{url}/metrics", timeout=10, headers=auth_headers(args.api_key)).text
            auth_refused = refused_without_the_key(url, args.api_key) if args.api_key else None
            rss_end, rss_parts_end = rss_by_segment[-1], rss_parts_mb(server.pid)
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            try:
                server_exit = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server_exit = server.wait()
    results: list[dict] = [{} for _ in plan]
    for position, index in enumerate(order):
        results[index] = shuffled[position]
    good, bad = results[:len(prompts)], results[len(prompts):]

    wall = sum(served_s)
    good_by_segment = [sum(order[p] < len(prompts) for p in positions) for positions in segments]
    batches = metric_value(after, "moderation_batch_size_count") - metric_value(before, "moderation_batch_size_count")
    batched_texts = metric_value(after, "moderation_batch_size_sum") - metric_value(before, "moderation_batch_size_sum")
    ceiling = batch_size_ceiling(classifier, prompts[:args.ceiling_prompts], round(batched_texts / batches)) \
        if batches and args.ceiling_prompts > 0 else {}

    # Every prompt is scored offline twice where kernels are built per shape (all in one call, then
    # with its segment): their largest difference over all prompts, not only the ceiling's, bounds
    # how far batch composition moves a score, so the served scores are held to twice that.
    pass_difference = offline_pass_difference(first_pass, offline) if first_pass is not None else {}
    tolerance = accepted_tolerance(args.tolerance, ceiling, pass_difference)
    good_not_200 = sum(result["status"] != 200 for result in good)
    bad_not_4xx = sum(result["status"] != expected_status[result["kind"]] for result in bad)
    differences, flag_mismatches, judged_mismatches = [], 0, 0
    for result, offline_row, value in zip(good, offline, prompts):
        if result["status"] != 200:
            continue
        difference, flag_mismatch = check_answer(classifier, result["body"]["results"][0], offline_row, tolerance,
                                                 judged_part(value))
        differences.append(difference)
        flag_mismatches += int(flag_mismatch)
        judged_mismatches += int(result["body"]["results"][0].get("judged") != judged_part(value))
    score_mismatches = int(sum(difference > tolerance for difference in differences))
    latencies_ms = np.array([r["latency"] * 1000 for r in good if r["status"] == 200] or [0.0])
    model_seconds = (metric_value(after, "moderation_batch_duration_seconds_sum")
                     - metric_value(before, "moderation_batch_duration_seconds_sum"))
    served_pps = len(prompts) / wall
    offline_pps = len(prompts) / sum(offline_s)
    ratios = throughput_ratios(served_s, offline_s)
    statuses = Counter(str(r["status"]) if r["status"] is not None else "transport_error" for r in results)
    checks_passed = good_not_200 == 0 and bad_not_4xx == 0 and score_mismatches == 0 and flag_mismatches == 0 \
        and judged_mismatches == 0 and auth_refused is not False and server_exit == 0
    conversations = sum(judged_part(value) == "response" for value in prompts)

    figures = {
        "requests": len(plan), "good_requests": len(good), "conversation_requests": conversations,
        "bad_requests": len(bad), "concurrency": args.concurrency,
        "segments": len(segments),
        "wall_s": round(wall, 3), "requests_per_s": round(len(plan) / wall, 2), "prompts_per_s": round(served_pps, 2),
        "latency_ms_p50": round(float(np.percentile(latencies_ms, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(latencies_ms, 95)), 2),
        "latency_ms_p99": round(float(np.percentile(latencies_ms, 99)), 2),
        "status_counts": dict(sorted(statuses.items())),
        "batches": int(batches), "mean_batch_size": round(batched_texts / batches, 2) if batches else 0.0,
        "served_prompts_per_s_by_segment": [round(count / s, 2) for count, s in zip(good_by_segment, served_s)],
        "offline_prompts_per_s_by_segment": [round(count / s, 2) for count, s in zip(good_by_segment, offline_s)],
        "server_cpu_share": round(server_cpu / (wall * CPU_COUNT), 3),
        "server_event_loop_cpu_share": round(event_loop_cpu / (wall * CPU_COUNT), 3),
        "load_generator_cpu_share": round(client_cpu / (wall * CPU_COUNT), 3),
        "server_rss_mb_start": round(rss_start, 1), "server_rss_mb_end": round(rss_end, 1),
        "server_rss_mb_peak": round(max(sampler.values, default=rss_end), 1),
        "server_rss_growth": round(rss_end / rss_start - 1, 4),
        "server_rss_mb_by_segment": rss_by_segment,
        "server_rss_parts_mb_start": rss_parts_start, "server_rss_parts_mb_end": rss_parts_end,
        "server_ready_s": round(ready_s, 1), "server_exit_code": server_exit,
        # Where a gap to offline comes from: the model thread idle between batches (busy share below 1),
        # or batches that score fewer prompts per second of model time than the offline call.
        "model_busy_share": round(model_seconds / wall, 3),
        "prompts_per_model_second": round(batched_texts / model_seconds, 2) if model_seconds else 0.0,
        "offline_prompts_per_s": round(offline_pps, 2), **ratios,
        "offline_warm_up_prompts_per_s": round(len(prompts) / offline_warm_up_s, 2) if offline_warm_up_s else None,
        **ceiling, **pass_difference,
        "max_abs_score_difference": float(max(differences, default=0.0)), "tolerance": tolerance,
        "score_mismatches": score_mismatches, "flag_mismatches": flag_mismatches,
        "judged_mismatches": judged_mismatches, "api_key": bool(args.api_key), "refused_without_the_key": auth_refused,
        "good_not_200": good_not_200, "bad_not_expected_4xx": bad_not_4xx, "checks_passed": checks_passed,
        "prompts": source, "model_dir": args.model_dir, "dtype": args.dtype, "device": args.device or "default",
        "quick": args.quick,
    }
    rows = [
        ("requests (good + bad)", (f"{len(plan)} ({len(good)} + {len(bad)}) at concurrency {args.concurrency}, "
                                   f"in {len(segments)} segments; {conversations} good ones conversations")),
        ("served prompts/s", f"{served_pps:.1f} ({len(plan) / wall:.1f} requests/s, {wall:.1f} s)"),
        ("offline prompts/s", f"{offline_pps:.1f} ({sum(offline_s):.1f} s)" + (
            f"; untimed first pass {len(prompts) / offline_warm_up_s:.1f}" if offline_warm_up_s else "")),
        ("served / offline", (f"{ratios['served_vs_offline_ratio']:.2f} (segments: median "
                              f"{ratios['served_vs_offline_median']:.2f}, "
                              f"{ratios['served_vs_offline_range'][0]:.2f}-{ratios['served_vs_offline_range'][1]:.2f})")),
        ("served prompts/s by segment", " ".join(f"{v:.1f}" for v in figures["served_prompts_per_s_by_segment"])),
        ("offline prompts/s by segment", " ".join(f"{v:.1f}" for v in figures["offline_prompts_per_s_by_segment"])),
        ("model thread busy, its rate", (f"{100 * figures['model_busy_share']:.0f} % of the served time, "
                                         f"{figures['prompts_per_model_second']:.1f} prompts per busy second")),
        *([("offline in served-size batches", (
            f"{ceiling['ceiling_batched_prompts_per_s']:.1f} prompts/s in batches of {ceiling['ceiling_batch_size']} "
            f"against {ceiling['ceiling_one_call_prompts_per_s']:.1f} in one call on {ceiling['ceiling_prompts']} "
            f"prompts: {ceiling['batch_size_ceiling']:.2f}"))] if ceiling else []),
        ("CPU: server (event loop), load gen.", (
            f"{100 * figures['server_cpu_share']:.0f} % ({100 * figures['server_event_loop_cpu_share']:.0f} %), "
            f"{100 * figures['load_generator_cpu_share']:.0f} % of {CPU_COUNT} cores' time while serving")),
        ("latency p50 / p95 / p99", (f"{figures['latency_ms_p50']:.1f} / {figures['latency_ms_p95']:.1f} / "
                                     f"{figures['latency_ms_p99']:.1f} ms")),
        ("status counts", ", ".join(f"{k}: {v}" for k, v in figures["status_counts"].items())),
        ("batches, mean batch size", f"{int(batches)}, {figures['mean_batch_size']}"),
        ("server RSS start / peak / end", (f"{rss_start:.0f} / {figures['server_rss_mb_peak']:.0f} / {rss_end:.0f} MiB "
                                           f"({100 * figures['server_rss_growth']:+.1f} %)")),
        ("server RSS after each segment", " ".join(f"{value:.0f}" for value in rss_by_segment)),
        *([("server RSS anonymous / file-backed", (
            f"{rss_parts_start['RssAnon']:.0f} / {rss_parts_start['RssFile']:.0f} MiB at the start, "
            f"{rss_parts_end['RssAnon']:.0f} / {rss_parts_end['RssFile']:.0f} at the end"))]
          if rss_parts_start and rss_parts_end else []),
        ("max |served - offline|", f"{figures['max_abs_score_difference']:.2e} (tolerance {tolerance:.1e})"),
        *([("max |offline - offline|", (
            f"{pass_difference['offline_pass_difference']:.2e} over all prompts, one call against their segments' "
            f"(99.9th percentile {pass_difference['offline_pass_difference_p999']:.2e})"))] if pass_difference else []),
        ("checks", "passed" if checks_passed else (
         f"FAILED: {good_not_200} good not 200, {bad_not_4xx} bad not the expected 4xx, {score_mismatches} scores, "
         f"{flag_mismatches} flags and {judged_mismatches} judged texts off, "
         f"{'refused without the key' if auth_refused is not False else 'SERVED without the key'}, "
         f"server exit {server_exit} (server log: {log_path})")),
    ]
    for name, value in rows:
        print(f"{name:<36} {value}")
    print(json.dumps(figures))
    return 0 if checks_passed else 1


if __name__ == "__main__":
    sys.exit(main())
