"""Calibration and evaluation text, split by document, tokenized into fixed-length windows.

Sources: ``pydoc`` (built in: CPython's ``pydoc_data.topics``, 79 documents, no network), a local
``.txt``/``.jsonl``/``.json``/``.parquet`` file or folder (through ``datasets``), or a hub dataset id
when online. Documents are sorted by key and split alternately: odd positions (``keys[1::2]``) are
the evaluation half, even positions the calibration half, so the two never share a document.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from toolkit.errors import ToolkitError
from toolkit.paths import hub_reachable
from toolkit.schema import check_choices

if TYPE_CHECKING:  # the window specs are read by recipes and the CLI; only tokenizing needs torch
    import torch
    from transformers import PreTrainedTokenizerBase

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
Split = Literal["calibration", "evaluation"]
Sampling = Literal["sequential", "random"]
TextFormat = Literal["text", "chat"]


@dataclass(frozen=True)
class WindowSpec:
    """Which windows: ``split`` half of ``source``, ``count`` windows of ``length`` tokens.

    ``sequential``: non-overlapping windows from the start (evaluation protocol).
    ``random``: windows at seeded random offsets, overlap allowed (GPTQ-style calibration sampling).
    ``format: chat``: documents become conversations in the tokenizer's chat template (``conversations``)
    and every window starts at a conversation's start, so an instruct model is calibrated on the token
    stream it serves (system prompt, role markers, end-of-turn tokens) rather than on bare text; ``random``
    then draws distinct conversations.
    """

    source: str = "pydoc"
    split: Split = "evaluation"
    length: int = 512
    count: int = 16
    sampling: Sampling = "sequential"
    seed: int = 0
    text_field: str = "text"
    format: TextFormat = "text"

    def __post_init__(self) -> None:
        check_choices(self)
        if self.length < 2 or self.count < 1:
            raise ValueError(f"windows need length >= 2 and count >= 1, got length={self.length} count={self.count}")

    def record(self) -> dict[str, Any]:
        return asdict(self)


def pydoc_documents() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics)]


def _local_documents(path: Path, text_field: str) -> list[str]:
    from datasets import load_dataset

    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ToolkitError(f"{path} holds no {'/'.join(LOCAL_BUILDERS)} files")
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) != 1:
        raise ToolkitError(f"{path}: data files must all be one of {', '.join(LOCAL_BUILDERS)}")
    builder = builders.pop()
    assert builder is not None
    # ``sample_by="document"`` keeps each text file one document, like the pydoc topics.
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    ds = load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
    if text_field not in ds.column_names:
        raise ToolkitError(f"{path}: no '{text_field}' column (has {ds.column_names}); set data.text_field")
    return [t for t in ds[text_field] if t]


def _hub_documents(name: str, text_field: str) -> list[str]:
    from datasets import load_dataset

    if not hub_reachable():
        raise ToolkitError(
            f"cannot fetch dataset '{name}': the Hugging Face hub is unreachable (offline); "
            "use 'pydoc' or a local .txt/.jsonl/.parquet file"
        )
    try:
        ds = load_dataset(name, split="train")
    except (OSError, ConnectionError, ValueError) as exc:
        raise ToolkitError(
            f"cannot load dataset '{name}' (offline or unknown); use 'pydoc' or a local .txt/.jsonl/.parquet file"
        ) from exc
    if text_field not in ds.column_names:
        raise ToolkitError(f"dataset '{name}' has no '{text_field}' column (has {ds.column_names})")
    return [t for t in ds[text_field] if t]


def documents(source: str, text_field: str = "text") -> list[str]:
    if source == "pydoc":
        return pydoc_documents()
    path = Path(source).expanduser()
    if path.exists():
        return _local_documents(path, text_field)
    if source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_BUILDERS:
        raise ToolkitError(f"data file not found: {source}")
    return _hub_documents(source, text_field)


def split_documents(docs: list[str], split: str) -> list[str]:
    """Evaluation: documents at odd positions; calibration: even positions minus any exact duplicate of an
    evaluation document (pydoc's 'else' and 'if' topics are the same text), so the halves never overlap."""
    if len(docs) < 2:
        raise ToolkitError("the data source needs at least 2 documents to split into calibration and evaluation")
    evaluation = docs[1::2]
    if split == "evaluation":
        return evaluation
    seen = set(evaluation)
    return [d for d in docs[0::2] if d not in seen]


def split_text(docs: list[str], split: str) -> str:
    return "\n\n".join(split_documents(docs, split))


def conversations(documents: list[str], chunk_chars: int) -> list[list[dict[str, str]]]:
    """Documents as exchanges: a document's first line (a title, for pydoc topics) is the user's request and
    its body, cut at paragraph boundaries into pieces of about ``chunk_chars``, the assistant's answers (one
    exchange per piece); an underline below the title (reStructuredText's ``****``) is dropped."""
    out = []
    for doc in documents:
        title, _, body = doc.strip().partition("\n")
        lines = body.split("\n")
        if lines and lines[0].strip() and not any(c.isalnum() for c in lines[0]):
            lines = lines[1:]
        pieces: list[list[str]] = [[]]
        for para in (p for p in "\n".join(lines).strip().split("\n\n") if p.strip()):
            if pieces[-1] and sum(map(len, pieces[-1])) + len(para) > chunk_chars:
                pieces.append([])
            pieces[-1].append(para)
        out += [[{"role": "user", "content": title.strip()}, {"role": "assistant", "content": "\n\n".join(p)}]
                for p in pieces if p]
    return out


def _chat_windows(tokenizer: PreTrainedTokenizerBase, docs: list[str], spec: WindowSpec) -> torch.Tensor:
    """Windows that start where a conversation starts (system prompt, role markers and all), running on into
    the following conversations to fill ``length`` tokens."""
    import torch

    from toolkit.models import chat

    chat.require_template(tokenizer, "this one")
    pieces = [chat.render(tokenizer, c, "the tokenizer's chat template", tokenize=False)
              for c in conversations(docs, 3 * spec.length)]
    encoded = [tokenizer(str(p), add_special_tokens=False)["input_ids"] for p in pieces]
    ids = torch.tensor([t for e in encoded for t in e], dtype=torch.long)
    offsets = torch.tensor([0] + [len(e) for e in encoded[:-1]]).cumsum(0)
    if ids.numel() < spec.length:
        raise ToolkitError(f"the {spec.split} half of '{spec.source}' has {ids.numel()} tokens as conversations, "
                           f"fewer than one window of {spec.length}; lower the window length or add text")
    if spec.sampling == "sequential":
        chosen = torch.arange(spec.count) % len(offsets)
    else:
        gen = torch.Generator().manual_seed(spec.seed)
        n = len(offsets)
        chosen = (torch.randperm(n, generator=gen)[: spec.count] if spec.count <= n
                  else torch.randint(0, n, (spec.count,), generator=gen))
    starts = offsets[chosen].clamp(max=ids.numel() - spec.length)
    return torch.stack([ids[s : s + spec.length] for s in starts.tolist()])


def token_windows(tokenizer: PreTrainedTokenizerBase, spec: WindowSpec) -> torch.Tensor:
    """``[count, length]`` token ids from the chosen half, per ``spec``."""
    import torch

    docs = documents(spec.source, spec.text_field)
    if spec.format == "chat":
        return _chat_windows(tokenizer, split_documents(docs, spec.split), spec)
    text = split_text(docs, spec.split)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel()
    if spec.sampling == "sequential":
        need = spec.count * spec.length
        if available < need:
            raise ToolkitError(
                f"the {spec.split} half of '{spec.source}' has {available} tokens, fewer than "
                f"{spec.count} windows x {spec.length} = {need}; lower count/length or add text"
            )
        return ids[:need].reshape(spec.count, spec.length)
    if available < spec.length * 2:
        raise ToolkitError(
            f"the {spec.split} half of '{spec.source}' has {available} tokens, too few for random windows "
            f"of {spec.length}; lower the window length or add text"
        )
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, available - spec.length + 1, (spec.count,), generator=gen)
    return torch.stack([ids[s : s + spec.length] for s in starts.tolist()])
