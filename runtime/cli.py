"""``toolkit generate ARTIFACT --prompt ...``: the lead's cli.py calls ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import sys

from toolkit.runtime import GenerationConfig, load

DEFAULTS = GenerationConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="export folder (model.onnx + model.onnx.data + tokenizer), a run's output "
                        "folder, or any model `toolkit run` accepts (then generated with PyTorch)")
    parser.add_argument("--prompt", required=True, help="the user message (raw text to continue with --no-chat)")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, no chat template")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=DEFAULTS.repetition_penalty)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="ORT threads (default: physical cores)")
    parser.add_argument("--no-spin", dest="spin", action="store_false",
                        help="keep ORT threads from spinning (for machines where other processes need the cores)")


def config_from(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop_strings=tuple(args.stop),
    )


def run(args: argparse.Namespace) -> int:
    """Stream the answer to stdout and the timings to stderr. ToolkitError propagates to the caller."""
    config = config_from(args)
    engine = load(args.artifact, threads=args.threads, spin=args.spin)
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompt = args.prompt if args.no_chat else [*system, {"role": "user", "content": args.prompt}]
    tokens = 0
    for chunk in engine.stream(prompt, config):
        tokens += 1
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    seq = engine.last_timings
    if seq is not None:
        print(f"[{seq.prompt_tokens} prompt tokens, {tokens} generated; first token {seq.ttft_s * 1000:.0f} ms, "
              f"decode {seq.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0
