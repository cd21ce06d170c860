"""Load test of ``moegate serve``: throughput and latency with dynamic batching on and off, in one run.

    python benchmarks/serve_load.py --router results/router \\
        --questions ../shared/data/questions/dsci_seed_dev.csv --out benchmarks/results/serve_load.md

Starts ``moegate serve`` on a free loopback port (127.0.0.1 only) twice, with batching on and with
``--no-batching``; against each, 1, 8 and 32 concurrent clients (``--clients``) each send the real
dev questions one per request, one request at a time on a keep-alive connection, for at most
``--requests`` requests or ``--seconds`` seconds per level, whichever comes first (after a short
warm-up that is not counted). Then the server gets SIGTERM and must exit by itself. For reference,
the same questions through ``Router.route`` in this process: one question per call, and all the
questions of a 32-client round in one call. Prints a markdown table (and writes it with ``--out``).

The load generator is asyncio in this one process, a few hundred lines of HTTP/1.1 away from the
server on the same cores: on a 2-core machine it takes CPU from the server, as a client would on a
shared node. The table's header records the machine's load before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Connection:
    """One keep-alive HTTP/1.1 connection: enough client for JSON requests to our own server."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def load_level(port: int, questions: list[str], clients: int, max_requests: int, max_seconds: float,
                     warmup: int) -> dict:
    """``clients`` closed-loop clients, one question per request; latencies of the counted requests."""
    counter = iter(range(10**9))
    latencies: list[float] = []
    errors = 0
    deadline = [0.0]

    async def client() -> None:
        nonlocal errors
        conn = Connection(port)
        try:
            while True:
                i = next(counter)
                if i >= warmup + max_requests or (i >= warmup and time.perf_counter() > deadline[0]):
                    return
                body = json.dumps({"questions": [questions[i % len(questions)]]}).encode()
                t = time.perf_counter()
                status, reply = await conn.request("POST", "/route", body)
                if i >= warmup:
                    latencies.append(time.perf_counter() - t)
                    errors += status != 200 or len(json.loads(reply)["results"]) != 1
        finally:
            await conn.close()

    deadline[0] = time.perf_counter() + max_seconds + 5  # the warm-up's time does not count (reset below)
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    while len(latencies) == 0 and not all(t.done() for t in tasks):
        await asyncio.sleep(0.001)  # the first counted request has started: the clock starts
    t0 = time.perf_counter()
    deadline[0] = t0 + max_seconds
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "errors": int(errors), "wall_s": wall, "throughput": len(lat) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


async def scrape(port: int) -> dict[str, float]:
    conn = Connection(port)
    _, text = await conn.request("GET", "/metrics")
    await conn.close()
    out = {}
    for line in text.decode().splitlines():
        m = re.match(r"^(moegate_batch_questions_(?:sum|count)) ([0-9.e+]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def run_server(router: Path, batching: bool, args) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "moegate.cli", "serve", "--router", str(router), "--host", HOST, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-questions", "64",
           "--threads", str(args.threads)]
    if not batching:
        cmd.append("--no-batching")
    log = open(args.log_dir / f"serve_{'on' if batching else 'off'}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        return asyncio.run(_drive(proc, port, args))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def _drive(proc: subprocess.Popen, port: int, args) -> dict:
    started = time.perf_counter()
    while True:  # wait for /healthz
        if proc.poll() is not None:
            raise RuntimeError(f"moegate serve exited with {proc.returncode}; see {args.log_dir}")
        try:
            conn = Connection(port)
            status, _ = await conn.request("GET", "/healthz")
            await conn.close()
            if status == 200:
                break
        except OSError:
            pass
        if time.perf_counter() - started > 180:
            raise RuntimeError("moegate serve did not answer /healthz within 180 s")
        await asyncio.sleep(0.2)
    results = {}
    for clients in args.clients:
        before = await scrape(port)
        level = await load_level(port, args.texts, clients, args.requests, args.seconds, warmup=2 * clients)
        after = await scrape(port)
        calls = after["moegate_batch_questions_count"] - before["moegate_batch_questions_count"]
        level["mean_batch"] = (after["moegate_batch_questions_sum"] - before["moegate_batch_questions_sum"]) / calls
        results[clients] = level
        print(f"  {clients} clients: {level['throughput']:.1f} req/s, p50 {level['p50']:.1f} ms, "
              f"p99 {level['p99']:.1f} ms, mean batch {level['mean_batch']:.1f}", file=sys.stderr)
    return results


def in_process(router_dir: Path, texts: list[str], args) -> dict:
    import torch

    from moegate.router import Router

    torch.set_num_threads(args.threads)  # as the server's inference thread
    router = Router.from_pretrained(router_dir, device="cpu")
    router.route(texts[:8])  # warm-up
    rows = {}
    lat = []
    t0 = time.perf_counter()
    for q in texts[:args.requests]:
        t = time.perf_counter()
        router.route(q)
        lat.append(time.perf_counter() - t)
        if time.perf_counter() - t0 > args.seconds:
            break
    wall = time.perf_counter() - t0
    lat = np.array(lat) * 1000
    rows["route(), 1 question per call"] = {"requests": len(lat), "throughput": len(lat) / wall,
                                            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                                            "mean_batch": 1.0, "errors": 0}
    size = max(args.clients)
    lat, n = [], 0
    t0 = time.perf_counter()
    while n < args.requests and time.perf_counter() - t0 < args.seconds:
        batch = [texts[(n + i) % len(texts)] for i in range(size)]
        t = time.perf_counter()
        router.route(batch)
        lat.append(time.perf_counter() - t)
        n += size
    wall = time.perf_counter() - t0
    lat = np.array(lat) * 1000
    rows[f"route(), {size} questions per call"] = {
        "requests": n, "throughput": n / wall, "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)), "mean_batch": float(size), "errors": 0}
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", type=Path, default=Path("results/router"))
    parser.add_argument("--questions", type=Path, default=Path("../shared/data/questions/dsci_seed_dev.csv"),
                        help="CSV with a question column: the real dev questions sent one per request")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per level, comma-separated")
    parser.add_argument("--requests", type=int, default=600, help="most counted requests per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="most seconds per level")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: moegate serve's)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.threads is None:
        from moegate.serve import default_threads

        args.threads = default_threads()
    args.texts = pd.read_csv(args.questions)["question"].astype(str).tolist()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()

    rows = []
    for batching in (True, False):
        print(f"server, batching {'on' if batching else 'off'}:", file=sys.stderr)
        for clients, r in run_server(args.router, batching, args).items():
            rows.append((f"server, batching {'on' if batching else 'off'}", clients, r))
    for name, r in in_process(args.router, args.texts, args).items():
        rows.append((name + " (in-process)", "–", r))
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    on = {c: r for name, c, r in rows if name.endswith("on")}
    off = {c: r for name, c, r in rows if name.endswith("off")}
    lines = [f"`moegate serve` load test: router `{args.router}`, questions `{args.questions}` (one per request), "
             f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms; each level "
             f"≤ {args.requests} requests or ≤ {args.seconds:g} s after warm-up. Load before: `{uptime}`; "
             f"after: `{uptime_after}`.", "",
             "| mode | clients | requests | errors | throughput (req/s) | p50 ms | p99 ms | mean questions per model call |",
             "|---|---|---|---|---|---|---|---|"]
    for name, clients, r in rows:
        lines.append(f"| {name} | {clients} | {r['requests']} | {r['errors']} | {r['throughput']:.1f} | "
                     f"{r['p50']:.1f} | {r['p99']:.1f} | {r['mean_batch']:.1f} |")
    top = max(args.clients)
    if top in on and top in off:
        lines += ["", f"With {top} clients, batching on/off throughput: {on[top]['throughput'] / off[top]['throughput']:.2f}×"
                      f" (target ≥ 3×); p99 with batching {on[top]['p99']:.1f} ms (target ≤ 50 ms)."]
    lines.append(f"\n({time.perf_counter() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
