"""Command line: ``toolkit run | eval | generate | serve | inspect | compare``.

Options of ``eval`` are generated from ``EvaluationSpec`` so CLI and recipe defaults cannot drift.
Every failure prints one line (at most ``MESSAGE_LIMIT`` characters) and exits non-zero: 2 for bad
input (argparse's own errors included), 1 for an internal error.

The runtime installs alone (``pip install .``): this module imports the compiler side (torch, transformers,
the recipe schema's passes) only inside the commands that need it, so ``--help``, ``generate`` on an ONNX
export and ``compare`` run without it, and the others say in one line how to install it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if set(typing.get_args(tp) or (tp,)) <= {bool, type(None)}:  # bool, or bool | None (None: decided later)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"(default: {'auto' if f.default is None else f.default})")
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=f"(default: {f.default})")


def _from_options(cls: type, args: argparse.Namespace) -> Any:
    from toolkit.schema import build

    return build(cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}, "command line")


# what the ``compiler`` extra (``pip install '.[compiler]'``) adds to the runtime: import name -> distribution, the
# names of pyproject.toml's extra (a test keeps the two equal)
COMPILER_MODULES = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
                    "datasets": "datasets", "gguf": "gguf", "accelerate": "accelerate", "onnxscript": "onnxscript",
                    "yaml": "pyyaml", "tqdm": "tqdm"}


@contextlib.contextmanager
def compiler_side(command: str, what: str = "") -> Iterator[None]:
    """A package of the compiler extra missing (a runtime-only install) becomes one refusal that says how to add
    it (``what``: for which input, when the command also runs without it); any other missing module is a broken
    install and propagates."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in COMPILER_MODULES:
            raise
        raise ToolkitError(
            f"`toolkit {command}` needs the compiler side{what}, which this runtime-only install leaves out "
            f"({COMPILER_MODULES[top]} is not installed): install the compiler extra, in the toolkit's checkout "
            "pip install '.[compiler]' (or bash install.sh)"
        ) from exc


def limit_torch_threads() -> None:
    """PyTorch's pool never larger than the cores this process sees (its default can count more)."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


MESSAGE_LIMIT = 400


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """The first line of ``text``, cut to ``limit`` characters: an error is read, not scrolled."""
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[: limit - 25] + f"... ({len(first)} characters)"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line with exit 2, like every other refusal.

    ``deferred`` adds arguments when this (sub)parser is first used: options whose definition imports the
    compiler side are built only when their command runs (or shows its help)."""

    def __init__(self, *args: Any, deferred: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred = deferred

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            deferred(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def cmd_run(args: argparse.Namespace) -> int:
    from toolkit.evaluation.report import before_after_table
    from toolkit.pipeline import recipes, runner

    limit_torch_threads()
    recipe = recipes.load(args.recipe)
    runner.require_model_steps(recipe)
    result = runner.run(recipe, output=args.output, progress=not args.no_progress, log=_log,
                        overwrite=args.overwrite)
    print()
    print(before_after_table(result.before, result.after))
    print()
    for step in result.steps:
        how = "cached" if step.cache_hit else f"{step.measure.get('seconds', 0):.1f} s, peak RSS {step.measure.get('peak_rss_mb', 0):.0f} MB"
        print(f"pass {step.name}: {how}")
    print(f"total {result.seconds:.1f} s -> {result.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from toolkit import models
    from toolkit.pipeline import budget, runner
    from toolkit.pipeline.recipes import EvaluationSpec

    limit_torch_threads()
    spec = _from_options(EvaluationSpec, args)
    ref = models.resolve(args.model)
    models.check_lengths(ref, {"--length": spec.length})
    if args.reference and spec.kl is None:  # a reference asks for KL: evaluate in memory
        spec = dataclasses.replace(spec, kl=True)
    spec = runner.resolve_evaluation(spec, ref, runner.model_shape(ref), budget.budget_bytes(None), _log)
    metrics = runner.measure(spec, ref, models.load_tokenizer(ref), args.reference, progress=True)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


def _onnx_folder(target: str) -> Path | None:
    """An export folder, or the export inside a run's output folder; None for PyTorch models."""
    path = Path(target)
    for folder in (path, path / "export"):
        if (folder / "model.onnx").is_file():
            return folder
    return None


def _generation_config(args: argparse.Namespace) -> Any:
    from toolkit.runtime import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop_strings=tuple(args.stop), prompt_lookup=args.prompt_lookup,
        num_draft_tokens=args.num_draft_tokens if args.draft or args.prompt_lookup else 0,
    )


def _stream_onnx(folder: Path, args: argparse.Namespace, config: Any) -> int:
    """Stream the answer to stdout and the timings to stderr."""
    from toolkit.runtime import load

    draft = _onnx_folder(args.draft) if args.draft else None
    if args.draft and draft is None:
        raise ToolkitError(f"--draft {args.draft} is not an ONNX export (no model.onnx): give an export folder")
    # a speculating int8 target decodes one row as a pair, so verify and decode agree bit for bit
    engine = load(folder, threads=args.threads, spin=args.spin, draft=draft,
                  paired_decode=bool(args.draft or args.prompt_lookup))
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
    spec = engine.last_speculation
    if spec is not None:
        print(f"[speculative: {spec.num_accepted_tokens}/{spec.num_draft_tokens} drafted tokens accepted in "
              f"{spec.num_drafts} drafts, {spec.tokens_per_target_call:.2f} tokens per target call]", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = _generation_config(args)  # refuses max_new_tokens <= 0 and other bad settings before any work
    onnx_folder = _onnx_folder(args.artifact)
    if (args.draft or args.prompt_lookup) and onnx_folder is None:
        raise ToolkitError(f"--draft and --prompt-lookup speculate in the ONNX runtime, and {args.artifact} is not an "
                           "ONNX export: give an export folder")
    if args.draft and args.prompt_lookup:
        raise ToolkitError("--draft and --prompt-lookup are two draft sources: choose one")
    if onnx_folder is not None:
        return _stream_onnx(onnx_folder, args, config)
    with compiler_side("generate", f" for {args.artifact} (it holds no model.onnx, so it is not an ONNX export)"):
        from toolkit.evaluation.torch_generate import generate_text

        limit_torch_threads()
    source = args.artifact
    if (Path(source) / "model" / "config.json").is_file():  # a run's output folder
        source = str(Path(source) / "model")
    for chunk in generate_text(source, args.prompt, config.max_new_tokens, args.system, args.no_chat):
        print(chunk, end="", flush=True)
    print()
    return 0


# what the ``serve`` extra adds: import name -> distribution (pyproject.toml's extra; a test keeps the two equal)
SERVE_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "sse_starlette": "sse-starlette",
                 "prometheus_client": "prometheus-client"}


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server until SIGTERM (then drain and exit 0)."""
    from toolkit.serving.config import ServeConfig

    config = ServeConfig(Path(args.export), host=args.host, port=args.port, max_batch=args.max_batch,
                         max_queue=args.max_queue, threads=args.threads, shutdown_timeout=args.shutdown_timeout,
                         served_model_name=args.served_model_name, draft=args.draft, prompt_lookup=args.prompt_lookup,
                         num_draft_tokens=args.num_draft_tokens,
                         batch_exact=args.batch_exact)  # refuses bad settings before any import
    try:
        from toolkit.serving.app import serve
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in SERVE_MODULES:
            raise
        raise ToolkitError(f"`toolkit serve` needs the serve extra ({SERVE_MODULES[top]} is not installed): "
                           "pip install 'llm-toolkit[serve]' (in the toolkit's checkout: pip install '.[serve]')"
                           ) from exc
    serve(config)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Print (and optionally write) the markdown report; 0 when nothing regressed, 1 otherwise."""
    from toolkit.evaluation import compare
    from toolkit.paths import write_text_atomic

    thresholds = compare.Thresholds(args.max_ppl_increase, args.max_latency_regression)
    result = compare.compare(args.baseline, args.candidate, thresholds, args.allow_different_models)
    print(result.markdown)
    if args.output:
        write_text_atomic(args.output, result.markdown)
    return 0 if result.passed else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from toolkit.evaluation.report import describe_manifest
    from toolkit.manifest import read_manifest, verify_tree

    folder = Path(args.artifact)
    if not folder.is_dir():
        raise ToolkitError(f"artifact folder not found: {folder}")
    print(describe_manifest(read_manifest(folder)))
    if args.verify:
        checked, problems = verify_tree(folder)
        if problems:
            raise ToolkitError(f"{folder}: {len(problems)} problem(s) in {checked} manifest(s): {'; '.join(problems[:5])}")
        print(f"\nverified: every file of {checked} manifest(s) matches its size and sha256")
    return 0


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from toolkit.runtime import GenerationConfig

    d = GenerationConfig()
    parser.add_argument("artifact", help="export folder (model.onnx + model.onnx.data + tokenizer), a run's output "
                        "folder, or any model `toolkit run` accepts (then generated with PyTorch)")
    parser.add_argument("--prompt", required=True, help="the user message (raw text to continue with --no-chat)")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, no chat template")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--draft", default=None, help="speculative decoding: an export with the same tokenizer "
                        "drafts tokens that this one verifies (the output is unchanged)")
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="speculative decoding with drafts copied from n-gram matches in the prompt and output")
    parser.add_argument("--num-draft-tokens", type=int, default=d.num_draft_tokens,
                        help="the longest draft (with --draft or --prompt-lookup)")
    parser.add_argument("--threads", type=int, default=None, help="ORT threads (default: physical cores)")
    parser.add_argument("--no-spin", dest="spin", action="store_false",
                        help="keep ORT threads from spinning (for machines where other processes need the cores)")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from toolkit.runtime import GenerationConfig
    from toolkit.serving.config import ServeConfig

    helps = {"max_batch": "requests decoded together (cache rows)",
             "max_queue": "requests waiting for a row; past it, 503 with Retry-After",
             "threads": "ORT threads (default: physical cores)",
             "shutdown_timeout": "seconds in-flight requests get to finish after SIGTERM",
             "served_model_name": "the model name clients send (default: the export folder's name)",
             "draft": "speculative decoding for every request: an export with the same tokenizer drafts tokens "
                      "that the served export verifies (the output is unchanged)",
             "prompt_lookup": "speculative decoding for every request with drafts copied from n-gram matches in "
                              "the prompt and output",
             "num_draft_tokens": "the longest draft, with --draft or --prompt-lookup (default: "
                                 f"{GenerationConfig.num_draft_tokens}; a request may ask for less with "
                                 "num_speculative_tokens, 0 to turn it off)",
             "batch_exact": "with --draft or --prompt-lookup on an int8-activation export: decode concurrent "
                            "requests row by row so that each one's greedy output equals its output alone (one "
                            "call per request; default: speculate while one request runs, batch several without "
                            "speculation)"}
    parser.add_argument("export", help="export folder (model.onnx + model.onnx.data + tokenizer)")
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig)[1:]:  # the defaults are ServeConfig's, declared once
        flag, kind = "--" + f.name.replace("_", "-"), next(t for t in typing.get_args(hints[f.name]) or
                                                           (hints[f.name],) if t is not type(None))
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=helps.get(f.name, ""))
            continue
        parser.add_argument(flag, type=kind, default=f.default,
                            help=helps.get(f.name, "") + ("" if f.default is None else f" (default: {f.default})"))


def _fraction_option(text: str) -> float:
    """``parse_fraction`` for argparse, whose parser turns the message into one ``error:`` line."""
    from toolkit.evaluation.compare import parse_fraction

    try:
        return parse_fraction(text)
    except ToolkitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    from toolkit.evaluation.compare import SCHEMA, Thresholds

    d = Thresholds()
    parser.add_argument("baseline", type=Path, help=f"baseline report ({SCHEMA} JSON)")
    parser.add_argument("candidate", type=Path, help="candidate report")
    parser.add_argument("--max-ppl-increase", type=_fraction_option, default=d.max_ppl_increase, help="e.g. 1%%")
    parser.add_argument("--max-latency-regression", type=_fraction_option, default=d.max_latency_regression,
                        help="e.g. 10%%")
    parser.add_argument("--allow-different-models", action="store_true",
                        help="compare reports whose source hash or recipe differ (refused otherwise)")
    parser.add_argument("--output", type=Path, default=None, help="write the markdown report here")


def _add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """``eval``'s options, from the recipe schema (which imports the passes, hence torch)."""
    try:
        with compiler_side("eval"):
            from toolkit.pipeline.recipes import EvaluationSpec
    except ToolkitError as exc:
        parser.exit(2, f"error: {one_line(str(exc))}\n")
    _add_dataclass_options(parser, EvaluationSpec)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="toolkit", description="Quantize, distill, export and evaluate LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a recipe and print the before/after table")
    run.add_argument("recipe")
    run.add_argument("--output", type=Path, default=None, help="override the recipe's output folder")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--overwrite", action="store_true", help="replace a previous output of the toolkit at the output path")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="perplexity (and KL against --reference) of a model",
                        deferred=_add_evaluation_options)
    ev.add_argument("model")
    ev.add_argument("--reference", default=None, help="model to compare with (KL, top-1 agreement)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text from an ONNX export (runtime) or a model (uses the chat template)")
    _add_generate_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve an ONNX export over an OpenAI-compatible HTTP API (the serve extra)")
    _add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)

    cmp = sub.add_parser("compare", help="CI gate: fail when the candidate report regressed against the baseline")
    _add_compare_arguments(cmp)
    cmp.set_defaults(func=cmd_compare)

    ins = sub.add_parser("inspect", help="show an artifact's manifest")
    ins.add_argument("artifact")
    ins.add_argument("--verify", action="store_true", help="check every file against the sha256 of its manifest")
    ins.set_defaults(func=cmd_inspect)
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """One progress bar per long step of ours: the libraries' own bars (transformers' "Loading weights" and
    "Writing model shards", the GGUF conversion, hub downloads) are off; their warnings still show."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with compiler_side(args.command):
            return int(args.func(args))
    except ToolkitError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not the toolkit: a name too long, a permission, a full disk
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {one_line(f'{exc.strerror or exc}{where}; check the path and the disk')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was left half-written", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    # the last resort: one line, the traceback behind --debug. BaseException, not Exception: a Rust panic in
    # tokenizers or safetensors arrives as pyo3's PanicException, which derives from BaseException
    except BaseException as exc:
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
