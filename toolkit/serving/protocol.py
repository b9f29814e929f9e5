"""OpenAI's request and response shapes for ``/v1/chat/completions`` and ``/v1/completions``.

Requests are pydantic models with strict types (a string where a number belongs is refused, not coerced) and
the bounds OpenAI documents. A field this server does not serve is refused, as OpenAI's own API refuses an
unrecognized argument, rather than ignored (a client asking for ``response_format`` must not get plain text
silently); OpenAI's bookkeeping fields (``user``, ``metadata``, ``store``), its penalties at their neutral 0,
vLLM's extensions that load generators send (``top_k``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``)
and our ``num_speculative_tokens`` are taken. Responses are plain dicts built here, so every route answers in the
same shape.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from toolkit.runtime.generation import MAX_LOGPROBS, TokenLogprobs
from toolkit.runtime.tokenizer import Tokenizer

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Tokens = Annotated[int, Field(ge=1)]
STOP_LIMIT = 4  # stop sequences per request, as OpenAI


STRICT = ConfigDict(strict=True, extra="forbid")
Neutral = Annotated[float, Field(ge=0, le=0)]  # presence/frequency penalties: only their no-op value is served


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share. ``temperature`` 0 is greedy; OpenAI's default (1) samples."""

    model_config = STRICT
    model: str
    max_tokens: Tokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Neutral = 0.0
    frequency_penalty: Neutral = 0.0
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1)] = -1  # -1 or 0: no top-k filter
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    # ours (vLLM sets speculation per server only; the name is its setting's): the longest draft for this request,
    # 0 to turn speculation off, at most the server's --num-draft-tokens (None: the server's)
    num_speculative_tokens: Annotated[int, Field(ge=0)] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > STOP_LIMIT or any(not s for s in stops):
            raise ValueError(f"stop takes at most {STOP_LIMIT} non-empty strings")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Tokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    logprobs: int | None = None  # the legacy shape: refused, see below

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> None:
        if value is not None:
            raise ValueError("not served on /v1/completions: ask /v1/chat/completions with logprobs: true and "
                             "top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """Builds one request's response objects: the id, creation time and model name shared by all its chunks."""

    def __init__(self, request_id: str, model: str, chat: bool, tokenizer: Tokenizer) -> None:
        self.id, self.model, self.chat, self.tokenizer = request_id, model, chat, tokenizer
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def logprobs(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        """The chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            token = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
            # -inf (a masked stop token) is not JSON: OpenAI's floor for "never" is -9999
            return {"token": token, "logprob": max(logprob, -9999.0) if math.isfinite(logprob) else -9999.0,
                    "bytes": list(token.encode())}

        return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                            for e in entries]}

    def full(self, text: str, finish_reason: str, tokens: dict[str, int],
             logprobs: list[TokenLogprobs] | None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": self.logprobs(logprobs) if logprobs is not None else None,
                                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(False), "choices": [choice], "usage": tokens}

    def chunk(self, text: str, finish_reason: str | None, logprobs: list[TokenLogprobs] | None,
              first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta,
                                      "logprobs": self.logprobs(logprobs) if logprobs is not None else None,
                                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice], "usage": None}

    def usage_chunk(self, tokens: dict[str, int]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": tokens}
