"""A model's chat template where the toolkit renders it (calibration in chat format, ``toolkit generate`` with
PyTorch): a template that does not parse, or fails on a conversation, is one line naming the file it came from.

transformers compiles the template on first use, so a syntax error would otherwise surface as jinja2's
``TemplateSyntaxError`` in the middle of a run, after the passes before it had computed.
"""

from __future__ import annotations

from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from toolkit.errors import ToolkitError
from toolkit.models.sources import ModelRef

TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves it beside tokenizer_config.json
SAMPLE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]  # calibration's turns


def origin(ref: ModelRef) -> str:
    """Where ``ref``'s chat template is read from, for messages."""
    if ref.folder is not None:
        name = TEMPLATE_FILE if (ref.folder / TEMPLATE_FILE).is_file() else "tokenizer_config.json"
        return str(ref.folder / name)
    return f"the chat template of {ref.source}"


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str, **kwargs: Any) -> Any:
    """``tokenizer.apply_chat_template(messages, **kwargs)``; a failing template is a ToolkitError naming ``where``."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    # TemplateError: a syntax error, an undefined name or the template's raise_exception; TypeError: its own
    # expressions applied to the wrong values (``messages + 1``)
    except (jinja2.TemplateError, TypeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        how = (f"does not parse at line {exc.lineno}" if isinstance(exc, jinja2.TemplateSyntaxError)
               else "fails on a conversation")
        raise ToolkitError(f"{where}: the chat template {how} ({detail}); fix the template or remove it "
                           "(or calibrate with format: text, generate with --no-chat)") from None


def require_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Calibration in chat format needs a chat template; ``where`` names the tokenizer in the message."""
    if not getattr(tokenizer, "chat_template", None):
        raise ToolkitError(f"calibration format 'chat' needs a tokenizer with a chat template; {where} has none "
                           "(use format: text)")


def check(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Render one calibration conversation before any work depends on the template."""
    require_template(tokenizer, where)
    render(tokenizer, SAMPLE, where, tokenize=False)
