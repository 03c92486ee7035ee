"""CPU time an asyncio HTTP client spends per request: why benchmarks/load_test.py generates its
load with aiohttp. On a 2-core machine the load generator shares the cores with the server it
measures, so every millisecond of client CPU is taken from the model.

Starts a stub moderation endpoint (FastAPI on uvicorn, a 50 ms wait and a fixed answer of the
served size) on 127.0.0.1 in a subprocess, then sends it the same requests with each client in
turn, `--rounds` times, `--concurrency` at a time. The last line is one JSON object.

    python benchmarks/client_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load_test import free_port  # benchmarks/ is on the path of a script run from it

STUB_APP = '''
import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()
ANSWER = {"id": "modr-0", "model": "stub", "results": [{"flagged": False,
          "categories": {f"S{i}": False for i in range(1, 13)},
          "category_scores": {f"S{i}": 0.01 for i in range(1, 13)}}]}


@app.post("/v1/moderations")
async def moderations():
    await asyncio.sleep(0.05)
    return JSONResponse(ANSWER)


@app.get("/health")
async def health():
    return {"status": "ok"}
'''


async def with_httpx(url: str, body: bytes, requests: int, concurrency: int) -> None:
    pending = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker() -> None:
            for _ in pending:
                response = await client.post("/v1/moderations", content=body, headers={"content-type": "application/json"})
                response.json()
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def with_aiohttp(url: str, body: bytes, requests: int, concurrency: int) -> None:
    import aiohttp

    pending = iter(range(requests))
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            for _ in pending:
                async with session.post("/v1/moderations", data=body, headers={"content-type": "application/json"}) as response:
                    json.loads(await response.read())
        await asyncio.gather(*(worker() for _ in range(concurrency)))


CLIENTS = {"httpx": with_httpx, "aiohttp": with_aiohttp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    body = json.dumps({"input": "Can you help me write a cover letter for a data analyst job? " * 3}).encode()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "stub_app.py").write_text(STUB_APP)
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "stub_app:app", "--host", "127.0.0.1",
                                   "--port", str(port), "--log-level", "warning"], cwd=directory)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("error: the stub server did not start") from None
                    time.sleep(0.2)
            cpu_ms: dict[str, list[float]] = {name: [] for name in CLIENTS}
            for _ in range(args.rounds):
                for name, client in CLIENTS.items():
                    started = time.process_time()
                    asyncio.run(client(url, body, args.requests, args.concurrency))
                    cpu_ms[name].append(round(1000 * (time.process_time() - started) / args.requests, 3))
                    print(f"{name:<8} {cpu_ms[name][-1]:.2f} ms of CPU a request", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "cpu_ms_per_request": cpu_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
