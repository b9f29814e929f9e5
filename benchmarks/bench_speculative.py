"""Speculative decoding vs plain decode: each configuration in a fresh process, rounds interleaved.

Configurations (greedy, the same new tokens for every prompt; speculation does not change them):
- ``target``: plain decode of the target export (e.g. SmolLM2 float32);
- ``draft``: the target verifying drafts of ``--draft`` (e.g. the AWQ+GPTQ int4 export); ``--draft`` given again adds
  ``draft2``, ``draft3``, ... (two drafts for the same target compared in one run, each against the same ``target``);
- ``target-lookup`` (``--target-lookup``): prompt lookup on the target; ``target-paired`` (``--target-paired``): plain
  decode of the target with one-row steps paired, as a speculating int8 target decodes (what exactness costs a
  plain step). An int8 target (W8A8, or MatMulNBits at accuracy_level 4) speculates with paired calls, its plain
  ``target`` run decodes unpaired: the speedups are against what a user gets without speculation;
- ``int4`` / ``lookup``: plain decode of ``--int4`` and prompt lookup on it, on the copy-heavy and the no-copy
  prompt sets (speculative_prompts.py, from pydoc_data.topics); ``lookup-copy@MIN-MAX`` / ``lookup-nocopy@MIN-MAX``
  (``--lookup-ngrams MIN-MAX ...``): prompt lookup matching n-grams of MIN to MAX tokens, against the same plain runs;
- ``genai`` / ``genai-lookup``: onnxruntime-genai's og.Generator on ``--genai`` (a folder with genai_config.json)
  on the copy-heavy prompts, plain and with its n-gram speculation. Its Python API (0.18) offers
  GeneratorParams.set_speculative_options(max_draft_tokens, ngram_size, ngram_chained_lookup, min_adaptive_k,
  cooldown) and Generator.get_speculative_stats() (acceptance_rate, target_forward_passes, ...); a draft *model*
  is not among those options (an MtpGenerator covers multi-token-prediction heads), so no genai draft-model run.

``--costs`` instead times single calls in one process, interleaved (median ms): the target's one-row decode, unpaired
and paired, its verify of j+1 tokens (j = 1..k drafts, paired as a speculating int8 target runs it), a draft step
(one token through ``extend``) and a 4-row decode step, batched (unpaired) and row by row (paired, the exact batch of
an int8 target), after a 200-token context; then the speedup that Leviathan et al.'s arithmetic allows
at each draft length and a few acceptance rates, E[tokens | j] / (j * draft + verify(j)) in plain steps.

Reports per configuration the median decode tokens/s, per-round ratios to its baseline, acceptance rate, tokens
per target call and the draft's share of the decode time; then where a speculating configuration's decode time went
(per phase, from ``SpecStats``): draft calls (ms per drafted token, catch-up included), verify calls (ms each),
one-token decodes of speculating rows (paused drafting, empty drafts, positions too close to call) and the rest
(the scheduler's Python), beside the plain configuration's ms per token.

    .venv/bin/python benchmarks/bench_speculative.py --target runs/smollm2-fp32-onnx/export \
        --draft runs/smollm2-int4-awq-gptq-onnx/export --int4 runs/smollm2-int4-gptq-head4-onnx/export --rounds 5
    .venv/bin/python benchmarks/bench_speculative.py --target runs/smollm2-w8a8-smoothquant-onnx/export \
        --draft runs/smollm2-int4-awq-gptq-onnx/export --target-lookup --target-paired --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative_prompts import COPY, NO_COPY  # noqa: E402

BASELINES = {"target-lookup": "target", "target-paired": "target", "lookup-copy": "int4-copy",
             "lookup-nocopy": "int4-nocopy", "genai-lookup": "genai", "lookup-batch": "int4-batch",
             "lookup-batch-exact": "int4-batch"}


def baseline(name: str) -> str:
    """The configuration a configuration's speedup is over (itself where it is a baseline)."""
    return "target" if name.startswith("draft") else BASELINES.get(name.split("@")[0], "")


def lookup_ngrams(name: str) -> tuple[int, int] | None:
    """``lookup-copy@2-4`` -> (min_ngram, max_ngram) = (2, 4); None for the runtime's default lookup."""
    if "@" not in name:
        return None
    low, high = name.split("@")[1].split("-")
    return int(low), int(high)


def draft_folder(name: str, a: argparse.Namespace) -> Path | None:
    """``draft`` is the first ``--draft``, ``draftN`` the N-th; other configurations draft from no model."""
    if not name.startswith("draft"):
        return None
    return a.draft[int(name[5:] or 1) - 1]


def run_batch(name: str, a: argparse.Namespace) -> dict[str, float]:
    """The copy-heavy prompts decoded ``--batch`` at a time (continuous batching): aggregate tokens/s over the
    wall time, plain (``int4-batch``) or with prompt lookup, a paired target's batch row by row
    (``lookup-batch-exact``) or batched without speculation while several rows run (``lookup-batch``)."""
    import time

    from toolkit.runtime import GenerationConfig, load

    lookup = name.startswith("lookup")
    engine = load(a.int4, threads=a.threads, max_batch=a.batch, accuracy_level=a.accuracy_level,
                  paired_decode=lookup, batch_exact=name.endswith("exact"))
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                              num_draft_tokens=a.k if lookup else 0, prompt_lookup=lookup)
    chats = [[{"role": "user", "content": p}] for p in COPY]
    engine.generate_batch(chats[: a.batch], GenerationConfig(max_new_tokens=8, num_draft_tokens=0))  # warm-up
    t0 = time.perf_counter()
    results = engine.generate_batch(chats, config)
    seconds = time.perf_counter() - t0
    drafted = sum(r.speculation.num_draft_tokens for r in results if r.speculation)
    accepted = sum(r.speculation.num_accepted_tokens for r in results if r.speculation)
    return {"tok_s": sum(len(r.token_ids) for r in results) / seconds, "acceptance": accepted / drafted if drafted else 0.0,
            "tokens_per_call": 0.0, "draft_share": 0.0}


def run_one(name: str, a: argparse.Namespace) -> dict[str, float]:
    """One configuration in this process: decode tokens/s over its prompt set and the speculation counters."""
    from toolkit.runtime import GenerationConfig, load
    from toolkit.runtime.speculative import PromptLookup

    if "batch" in name:
        return run_batch(name, a)
    folder = a.target if name.startswith(("target", "draft")) else a.int4
    level = a.accuracy_level if folder == a.int4 else None
    lookup = name.startswith("lookup") or name == "target-lookup"
    draft = draft_folder(name, a)
    speculates = lookup or draft is not None
    # an int8 target that speculates decodes one row as a pair (exact verify); plain runs keep the one-row path
    engine = load(folder, threads=a.threads, max_batch=1, draft=draft,
                  accuracy_level=level, paired_decode=speculates or name == "target-paired")
    if (ngrams := lookup_ngrams(name)) is not None:
        engine.prompt_lookup = PromptLookup(max_ngram=ngrams[1], min_ngram=ngrams[0])
    prompts = NO_COPY if name.split("@")[0].endswith("nocopy") else COPY
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                              num_draft_tokens=a.k if speculates else 0, prompt_lookup=lookup)
    engine.generate(prompts[0], GenerationConfig(max_new_tokens=8, num_draft_tokens=0))  # warm-up
    tokens = seconds = 0.0
    totals = dict.fromkeys(("num_drafts", "num_draft_tokens", "num_accepted_tokens", "target_calls", "emitted_tokens",
                            "deferred", "draft_s", "score_s", "plain_s"), 0.0)
    for prompt in prompts:
        r = engine.generate([{"role": "user", "content": prompt}], config)
        tokens, seconds = tokens + len(r.timings.token_latencies_s), seconds + r.timings.decode_s
        if r.speculation is not None:
            for key in totals:
                totals[key] += getattr(r.speculation, key)
    t = totals
    return {"tok_s": tokens / seconds, "ms_per_token": 1e3 * seconds / tokens,
            "acceptance": t["num_accepted_tokens"] / t["num_draft_tokens"] if t["num_draft_tokens"] else 0.0,
            "tokens_per_call": t["emitted_tokens"] / t["target_calls"] if t["target_calls"] else 1.0,
            "draft_share": t["draft_s"] / seconds, "verify_share": t["score_s"] / seconds,
            "plain_share": t["plain_s"] / seconds,
            "draft_ms_per_token": 1e3 * t["draft_s"] / t["num_draft_tokens"] if t["num_draft_tokens"] else 0.0,
            "verify_ms": 1e3 * t["score_s"] / t["num_drafts"] if t["num_drafts"] else 0.0,
            "deferred": t["deferred"] / t["num_drafts"] if t["num_drafts"] else 0.0}


def run_genai(a: argparse.Namespace, speculate: bool) -> dict[str, float]:
    import time

    import onnxruntime_genai as og
    from bench_runtime import genai_folder

    from toolkit.runtime import Tokenizer

    model = og.Model(str(genai_folder(a.genai, a.threads)))  # its intra-op pool pinned to --threads, as ours
    tok = Tokenizer.from_folder(a.genai)  # the same chat-templated ids as our runs
    tokens, seconds, accepted, proposed = 0, 0.0, 0.0, 0.0
    for prompt in COPY:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=4096, min_length=0)
        if speculate:
            params.set_speculative_options(ngram_size=3, max_draft_tokens=a.k)
        gen = og.Generator(model, params)
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        gen.append_tokens(tok.encode(text, add_special_tokens=False))
        gen.generate_next_token()
        t0 = time.perf_counter()
        for _ in range(a.new_tokens - 1):
            gen.generate_next_token()
        seconds += time.perf_counter() - t0
        tokens += a.new_tokens - 1
        if speculate:
            stats = gen.get_speculative_stats()
            accepted += stats["draft_tokens_accepted"]
            proposed += stats["draft_tokens_evaluated"]
    return {"tok_s": tokens / seconds, "ms_per_token": 1e3 * seconds / tokens,
            "acceptance": accepted / proposed if proposed else 0.0, "tokens_per_call": 1.0, "draft_share": 0.0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, help="the verified export (e.g. float32); without it only --int4 and "
                   "--genai runs")
    p.add_argument("--draft", type=Path, action="append", default=[],
                   help="the drafting export (same tokenizer); again for a second draft of the same target")
    p.add_argument("--target-lookup", action="store_true", help="also prompt lookup on the target")
    p.add_argument("--target-paired", action="store_true", help="also the target's plain decode with paired one-row "
                   "steps (an int8-activation target: what a speculating run's one-token decodes cost)")
    p.add_argument("--int4", type=Path, help="an int4 export for prompt lookup vs its plain decode")
    p.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits level for the --int4 runs (0: float "
                   "activations; 4: int8, speculating runs decode one row as a pair; None: the export's)")
    p.add_argument("--genai", type=Path, help="an onnxruntime-genai build (genai_config.json) of the same model")
    p.add_argument("--batch", type=int, default=0, help="with --int4: the copy-heavy prompts decoded N at a time "
                   "(aggregate tokens/s, prefill included): plain, and prompt lookup with a paired batch row by row "
                   "(exact) or batched without speculation")
    p.add_argument("--lookup-ngrams", nargs="*", default=[], metavar="MIN-MAX",
                   help="with --int4: prompt lookup also with these n-gram bounds (e.g. 1-3 2-4), beside the "
                        "runtime's default, in the same interleaved rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="the longest draft")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--costs", action="store_true", help="time single calls (target decode, paired decode, verify, "
                   "draft step) and print what they allow, instead of the configurations")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration here and print its JSON
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if not a.target and (a.draft or a.target_lookup or a.target_paired or a.costs):
        p.error("--draft, --target-lookup, --target-paired and --costs need --target")
    if a.costs:
        print_costs(step_costs(a), a.k)
        return 0
    if a.one:
        genai = a.one.startswith("genai")
        print(json.dumps(run_genai(a, a.one == "genai-lookup") if genai else run_one(a.one, a)))
        return 0
    names = configurations(a)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for _ in range(a.rounds):
        for name in names:  # interleaved: load on a shared machine hits every configuration alike
            out = subprocess.run([sys.executable, __file__, *passthrough, "--one", name], check=True,
                                 capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    for i, folder in enumerate(a.draft):
        print(f"{'draft' if i == 0 else f'draft{i + 1}'}: {folder}")
    print(f"{'config':>18} {'tok/s':>8} {'ratio':>6}  per-round ratios            accept  tok/call  draft share")
    for name in names:
        runs = results[name]
        base = results.get(baseline(name), runs)
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(runs, base, strict=True)]
        med = statistics.median
        print(f"{name:>18} {med(r['tok_s'] for r in runs):8.1f} {med(ratios):6.2f}  "
              f"{' '.join(f'{x:.2f}' for x in ratios):<27} {med(r['acceptance'] for r in runs):6.2f}  "
              f"{med(r['tokens_per_call'] for r in runs):8.2f}  {med(r['draft_share'] for r in runs):11.2f}")
    print_phases(results)
    return 0


CONTEXT = 200  # tokens before the timed calls (a prompt and some generated text)
CALLS = 30  # timed calls per kind
ROWS = 4  # the batch whose decode step is timed batched (unpaired) and row by row (paired)


def step_costs(a: argparse.Namespace) -> dict[str, float]:
    """Median ms per call, the kinds interleaved call by call so that load hits each alike; sessions set up as
    ``load`` sets up a target and its draft (intra-op pools stop spinning after each call)."""
    import time
    from dataclasses import replace

    import numpy as np

    from toolkit.runtime.backend import BackendOptions, OrtBackend

    if len(a.draft) != 1:
        raise SystemExit("--costs needs one --draft")
    options = BackendOptions(threads=a.threads, stop_spinning=True)
    plain, paired = OrtBackend(a.target, options), OrtBackend(a.target, replace(options, paired_decode=True))
    draft = OrtBackend(a.draft[0], options)
    context = np.arange(1000, 1000 + CONTEXT, dtype=np.int64)
    for backend in (plain, paired, draft):
        backend.allocate(ROWS, 2 * CONTEXT)
        for row in range(ROWS if backend is not draft else 1):
            backend.prefill(row, context, 0)
    token, length = np.array([1234], np.int64), np.array([CONTEXT])
    batch, lengths = np.full(ROWS, 1234, np.int64), np.full(ROWS, CONTEXT)
    tokens = np.arange(2000, 2001 + a.k, dtype=np.int64)  # [k+1]: the pending token and k drafts
    calls = {"decode": lambda: plain.decode_row(int(token[0]), CONTEXT, False),  # one stream's plain step
             "paired": lambda: paired.decode_next(token, length, False),
             "draft": lambda: draft.extend(0, token, CONTEXT),
             f"batch{ROWS}": lambda: plain.decode_next(batch, lengths, False),
             f"rows{ROWS}": lambda: paired.decode_next(batch, lengths, False)}
    calls |= {f"verify{j}": (lambda j=j: paired.extend(0, tokens[: j + 1], CONTEXT)) for j in range(1, a.k + 1)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: bindings, first-call allocations
        call()
    for _ in range(CALLS):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def allowed_speedup(costs: dict[str, float], j: int, acceptance: float) -> float:
    """Tokens per plain step of a round of j drafts: E[tokens | j] / (j * draft + verify(j)), costs in ms."""
    a = min(acceptance, 1.0 - 1e-9)
    expected = (1.0 - a ** (j + 1)) / (1.0 - a)
    return expected * costs["decode"] / (j * costs["draft"] + costs[f"verify{j}"])


def print_costs(costs: dict[str, float], k: int) -> None:
    base = costs["decode"]
    print(f"{'call':>10} {'ms':>7} {'/ decode':>8}")
    for name, ms in costs.items():
        print(f"{name:>10} {ms:7.2f} {ms / base:8.2f}")
    rates = (0.6, 0.7, 0.8, 0.9)
    print(f"\n{'drafts':>10} " + " ".join(f"{f'a={r}':>7}" for r in rates) + "   (speedup over plain decode)")
    for j in range(1, k + 1):
        print(f"{j:>10} " + " ".join(f"{allowed_speedup(costs, j, r):7.2f}" for r in rates))


def configurations(a: argparse.Namespace) -> list[str]:
    drafts = ["draft" if i == 0 else f"draft{i + 1}" for i in range(len(a.draft))]
    names = ["target", *drafts] if a.target else []
    names += (["target-lookup"] if a.target_lookup else []) + (["target-paired"] if a.target_paired else [])
    if a.int4 and not a.batch:
        sweep = [f"@{ngrams}" for ngrams in a.lookup_ngrams]
        names += ["int4-copy", "lookup-copy", *(f"lookup-copy{s}" for s in sweep),
                  "int4-nocopy", "lookup-nocopy", *(f"lookup-nocopy{s}" for s in sweep)]
    names += ["int4-batch", "lookup-batch-exact", "lookup-batch"] if a.int4 and a.batch else []
    return names + (["genai", "genai-lookup"] if a.genai else [])


def print_phases(results: dict[str, list[dict[str, float]]]) -> None:
    """Where each speculating configuration's decode time went (medians over rounds), beside its baseline's plain
    ms per token: what a round costs against what the arithmetic allows. ``draft/plain``: a drafted token's cost
    over a plain step of the baseline (c in Leviathan et al. 2023, sec. 3.4): at acceptance a and k drafts a round
    emits (1 - a^(k+1)) / (1 - a) tokens for k * c plain steps of drafting plus a verify."""
    med = statistics.median
    rows = [name for name, runs in results.items() if "verify_ms" in runs[0] and med(r["verify_ms"] for r in runs)]
    if not rows:
        return
    print(f"\n{'phases':>18} {'ms/tok':>7} {'plain':>6}  draft  verify  1-token  python  "
          f"{'draft ms/tok':>12} {'draft/plain':>11} {'verify ms':>9} deferred")
    for name in rows:
        runs, base = results[name], results.get(baseline(name), results[name])
        draft, verify, plain = (med(r[k] for r in runs) for k in ("draft_share", "verify_share", "plain_share"))
        base_ms, draft_ms = med(r["ms_per_token"] for r in base), med(r["draft_ms_per_token"] for r in runs)
        print(f"{name:>18} {med(r['ms_per_token'] for r in runs):7.2f} {base_ms:6.2f}  "
              f"{draft:5.2f}  {verify:6.2f}  {plain:7.2f}  {1 - draft - verify - plain:6.2f}  "
              f"{draft_ms:12.2f} {draft_ms / base_ms:11.2f} {med(r['verify_ms'] for r in runs):9.2f} "
              f"{med(r['deferred'] for r in runs):8.2f}")


if __name__ == "__main__":
    sys.exit(main())
