"""Text generation with a PyTorch model, float or packed (the ONNX runtime has its own entry in toolkit.runtime)."""

from __future__ import annotations

from collections.abc import Iterator
from threading import Thread
from typing import Any

import torch
from transformers import TextIteratorStreamer

from toolkit import models
from toolkit.errors import ToolkitError
from toolkit.models import chat
from toolkit.quant import checkpoint

STREAM_TIMEOUT_S = 600.0  # a generate thread that dies cannot leave the reader waiting forever


def chat_ids(tokenizer, prompt: str, system: str | None, raw: bool,  # type: ignore[no-untyped-def]
             where: str = "the tokenizer's chat template") -> torch.Tensor:
    if raw or not tokenizer.chat_template:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out = chat.render(tokenizer, messages, where, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return out["input_ids"]


def check_budget(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse a request that cannot run: no new tokens, or more than the model's context holds."""
    if max_new_tokens < 1:
        raise ToolkitError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise ToolkitError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                           f"model's context of {context} tokens; lower --max-new-tokens to "
                           f"{max(0, context - prompt_tokens)} or shorten the prompt")


def generate_text(source: str, prompt: str, max_new_tokens: int = 128, system: str | None = None,
                  raw: bool = False) -> Iterator[str]:
    """Stream a greedy continuation of ``prompt`` (chat-formatted unless ``raw``)."""
    if max_new_tokens < 1:
        check_budget(0, max_new_tokens, None)
    ref = models.resolve(source)
    # the prompt is formatted and its budget checked with the tokenizer alone, before the weights are loaded
    ids = chat_ids(models.load_tokenizer(ref), prompt, system, raw, chat.origin(ref))
    check_budget(ids.shape[1], max_new_tokens, models.context_length(ref))
    loaded = checkpoint.load(source)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=STREAM_TIMEOUT_S)
    failure: list[BaseException] = []

    def work(**kwargs: Any) -> None:
        try:
            loaded.model.generate(**kwargs)
        except BaseException as exc:  # re-raised in the reader's thread below
            failure.append(exc)
            streamer.end()

    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  do_sample=False, streamer=streamer, pad_token_id=loaded.tokenizer.pad_token_id)
    thread = Thread(target=work, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]
