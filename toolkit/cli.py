"""Command line: ``toolkit run | eval | generate | inspect | compare``.

Options of ``eval`` are generated from ``EvaluationSpec`` so CLI and recipe defaults cannot drift.
Every failure prints one line (at most ``MESSAGE_LIMIT`` characters) and exits non-zero: 2 for bad
input (argparse's own errors included), 1 for an internal error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"(default: {f.default})")
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=f"(default: {f.default})")


def _from_options(cls: type, args: argparse.Namespace) -> Any:
    from toolkit.schema import build

    return build(cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}, "command line")


MESSAGE_LIMIT = 400


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """The first line of ``text``, cut to ``limit`` characters: an error is read, not scrolled."""
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[: limit - 25] + f"... ({len(first)} characters)"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line with exit 2, like every other refusal."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def cmd_run(args: argparse.Namespace) -> int:
    from toolkit.evaluation.report import before_after_table
    from toolkit.pipeline import recipes, runner

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
    from toolkit import data, models
    from toolkit.evaluation import perplexity
    from toolkit.paths import dir_bytes
    from toolkit.pipeline.recipes import EvaluationSpec

    spec = _from_options(EvaluationSpec, args)
    models.check_lengths(models.resolve(args.model), {"--length": spec.length})
    loaded = models.load(args.model)
    windows = data.token_windows(loaded.tokenizer, spec.windows())
    reference = models.load(args.reference).model if args.reference else None
    metrics: dict[str, Any] = perplexity.evaluate(loaded.model, windows, reference, spec.batch_size, progress=True)
    ref = models.resolve(args.model)
    metrics["bytes"] = dir_bytes(ref.folder) if ref.folder else None
    metrics["load_seconds"] = loaded.load_seconds
    metrics["windows"] = spec.windows().record()
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


def cmd_generate(args: argparse.Namespace) -> int:
    from toolkit.models.torch_generate import generate_text
    from toolkit.runtime import cli as runtime_cli

    onnx_folder = _onnx_folder(args.artifact)
    if onnx_folder is not None:
        args.artifact = str(onnx_folder)
        return runtime_cli.run(args)
    source = args.artifact
    if (Path(source) / "model" / "config.json").is_file():  # a run's output folder
        source = str(Path(source) / "model")
    for chunk in generate_text(source, args.prompt, args.max_new_tokens, args.system, args.no_chat):
        print(chunk, end="", flush=True)
    print()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from toolkit.evaluation import compare

    return compare.run(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from toolkit.evaluation.report import describe_manifest
    from toolkit.models import checkpoint

    folder = Path(args.artifact)
    if not folder.is_dir():
        raise ToolkitError(f"artifact folder not found: {folder}")
    print(describe_manifest(checkpoint.read_manifest(folder)))
    if args.verify:
        checked, problems = checkpoint.verify_tree(folder)
        if problems:
            raise ToolkitError(f"{folder}: {len(problems)} problem(s) in {checked} manifest(s): {'; '.join(problems[:5])}")
        print(f"\nverified: every file of {checked} manifest(s) matches its size and sha256")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from toolkit.pipeline.recipes import EvaluationSpec

    parser = _Parser(prog="toolkit", description="Quantize, distill, export and evaluate LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a recipe and print the before/after table")
    run.add_argument("recipe")
    run.add_argument("--output", type=Path, default=None, help="override the recipe's output folder")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--overwrite", action="store_true", help="replace a previous output of the toolkit at the output path")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="perplexity (and KL against --reference) of a model")
    ev.add_argument("model")
    ev.add_argument("--reference", default=None, help="model to compare with (KL, top-1 agreement)")
    ev.add_argument("--json", action="store_true")
    _add_dataclass_options(ev, EvaluationSpec)
    ev.set_defaults(func=cmd_eval)

    from toolkit.evaluation import compare
    from toolkit.runtime import cli as runtime_cli

    gen = sub.add_parser("generate", help="generate text from an ONNX export (runtime) or a model (uses the chat template)")
    runtime_cli.add_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    cmp = sub.add_parser("compare", help="CI gate: fail when the candidate report regressed against the baseline")
    compare.add_arguments(cmp)
    cmp.set_defaults(func=cmd_compare)

    ins = sub.add_parser("inspect", help="show an artifact's manifest")
    ins.add_argument("artifact")
    ins.add_argument("--verify", action="store_true", help="check every file against the sha256 of its manifest")
    ins.set_defaults(func=cmd_inspect)
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
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
    except Exception as exc:  # the last resort: one line, the traceback behind --debug
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
