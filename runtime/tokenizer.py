"""An export folder's tokenizer and chat template, without torch (transformers' AutoTokenizer imports it).

``tokenizer.json`` runs through the ``tokenizers`` library, as transformers' fast tokenizers do. The chat
template (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``) is rendered with jinja2
the way transformers' ``apply_chat_template`` renders it: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now`` and a JSON ``tojson``, the special tokens
as template variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from toolkit.errors import ToolkitError, panics_as_errors

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization, which it applies only to non-BPE models whose config asks for it
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

Message = dict[str, str]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; transformers overrides it the same way
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str, where: str = "the chat template") -> jinja2.Template:
    """The template as transformers compiles it; a syntax error is one line naming ``where`` (its file)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        line = f" at line {exc.lineno}" if isinstance(exc, jinja2.TemplateSyntaxError) else ""
        raise ToolkitError(f"{where}: the chat template does not parse{line} ({str(exc).splitlines()[0]}); fix "
                           "the template or remove it") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, core: tokenizers.Tokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, Any] | None = None, clean_up_spaces: bool = False,
                 template_origin: str = "the chat template") -> None:
        core.no_truncation()  # transformers' call default: no truncation, no padding
        core.no_padding()
        self.core, self.chat_template, self.template_origin = core, chat_template, template_origin
        self.special_tokens = special_tokens or {}
        self._template = compile_template(chat_template, template_origin) if chat_template else None
        self._clean_up = clean_up_spaces and json.loads(core.to_str())["model"]["type"] != "BPE"

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise ToolkitError(f"{folder} has no {TOKENIZER_FILE}: copy the tokenizer files with the export")
        with panics_as_errors(f"cannot load the tokenizer from {folder}; re-create {TOKENIZER_FILE}"):
            try:
                core = tokenizers.Tokenizer.from_file(str(path))
                config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
            except Exception as exc:  # tokenizers raises a bare Exception on malformed files
                raise ToolkitError(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
        if not isinstance(config, dict):
            raise ToolkitError(f"{folder / CONFIG_FILE} holds a JSON {type(config).__name__}, not an object; copy the "
                               "tokenizer files with the export again")
        template, origin = _chat_template(folder, config)
        special: dict[str, Any] = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens")
        if isinstance(extra, list):
            special["additional_special_tokens"] = [_token_text(t) for t in extra]
        return cls(core, template, special, bool(config.get("clean_up_tokenization_spaces", False)), origin)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.core.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.core.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return str(text)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ToolkitError("this model's tokenizer has no chat template: pass the prompt as plain text")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        # TemplateError: an undefined name or the template's raise_exception; TypeError: its expressions applied
        # to the wrong values
        except (jinja2.TemplateError, TypeError) as exc:
            raise ToolkitError(f"{self.template_origin}: the chat template refused these messages: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, str]:
    """The template's text and the file it came from."""
    path = folder / TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise ToolkitError(f"{path} is not UTF-8 text (byte {exc.start}); save the template as UTF-8") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template if isinstance(template, str) else None), str(folder / CONFIG_FILE)
