"""Text generation with a PyTorch model folder (the ONNX runtime has its own entry in toolkit.runtime)."""

from __future__ import annotations

from collections.abc import Iterator
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from toolkit import models
from toolkit.errors import ToolkitError


def chat_ids(tokenizer, prompt: str, system: str | None, raw: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if raw or not tokenizer.chat_template:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return out["input_ids"]


def generate_text(source: str, prompt: str, max_new_tokens: int = 128, system: str | None = None,
                  raw: bool = False) -> Iterator[str]:
    """Stream a greedy continuation of ``prompt`` (chat-formatted unless ``raw``)."""
    if max_new_tokens < 1:  # generate() would return at once and leave the streamer waiting forever
        raise ToolkitError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    loaded = models.load(source)
    ids = chat_ids(loaded.tokenizer, prompt, system, raw)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context and ids.shape[1] + max_new_tokens > context:
        raise ToolkitError(f"request needs {ids.shape[1] + max_new_tokens} positions (prompt + max_new_tokens) but "
                           f"the model's context is {context}: shorten the prompt or lower max_new_tokens")
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  do_sample=False, streamer=streamer, pad_token_id=loaded.tokenizer.pad_token_id)
    thread = Thread(target=loaded.model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
