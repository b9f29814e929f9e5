"""The export contract: one frozen, versioned record of what an export folder holds and how its graph is fed.

The exporter (``toolkit.passes.onnx``) builds an ``ExportContract`` and writes it as ``export.json``; the graph
builder takes its tensor names from it; the runtime, validation and benchmarks read it back with ``read_contract``.
Folders built by onnxruntime-genai (``genai_config.json`` only) are read by one adapter into the same record,
and the ``genai_config.json`` we write for onnxruntime-genai is generated from it.

No torch, onnx or onnxruntime here: a deployment reads this with the standard library alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from toolkit.errors import ToolkitError
from toolkit.paths import read_json

FORMAT = "llm-toolkit-onnx/1"
EXPORT_FILE = "export.json"
GENAI_FILE = "genai_config.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
Target = Literal["ort", "standard"]
TARGETS: tuple[str, ...] = get_args(Target)
# batches a graph serves: rows written from column 0 ("right"), ending in the last column ("left"), or both
PADDINGS = ("right", "left", "left or right")
CACHE_DTYPES = ("float32", "float16")
KINDS = ("key", "value")
NEXT_TOKEN = "next_token"  # the exporter's name for the graph's argmax output (and the runtime's, when it adds one)


@dataclass(frozen=True)
class TensorNames:
    """Graph input and output names; the cache names are printf templates of the layer index."""

    input_ids: str = "input_ids"  # int64 [B, S]
    attention_mask: str = "attention_mask"  # int64 [B, M]: 1 for cache columns in use
    position_ids: str | None = "position_ids"  # int64 [B, S]; None: the graph takes none
    logits: str = "logits"  # float32 [B, S, V]
    # int64 [B, S]: ArgMax of the logits over V (the first index on ties, as numpy's argmax); None: the graph has
    # none (the exporter's since it stopped writing one, onnxruntime-genai's): the runtime takes the argmax itself
    next_token: str | None = NEXT_TOKEN
    past_key: str = "past_key_values.%d.key"  # [B, KVH, P, D]
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"  # [B, KVH, P+S, D], or the past buffer itself when shared
    present_value: str = "present.%d.value"

    def past(self, layer: int, kind: str) -> str:
        return (self.past_key if kind == "key" else self.past_value) % layer

    def present(self, layer: int, kind: str) -> str:
        return (self.present_key if kind == "key" else self.present_value) % layer

    def cache_pairs(self, num_layers: int) -> list[tuple[str, str]]:
        """(past input, present output) per buffer: layer 0 key, layer 0 value, layer 1 key, ..."""
        return [(self.past(i, kind), self.present(i, kind)) for i in range(num_layers) for kind in KINDS]


@dataclass(frozen=True)
class ExportContract:
    target: str  # "ort": contrib ops, past and present may share one buffer; "standard": ONNX ops only
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int  # longest sequence the graph serves (its rotary cache rows)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    padding: str = "right"
    weights: str = "float32"  # "int": quantized linears
    accuracy_level: int | None = None  # MatMulNBits' level as exported; None: not recorded (foreign folders)
    cache_dtype: str = "float32"
    share_buffer: bool = True  # past and present may be bound to one preallocated buffer (GQA, TensorScatter)
    names: TensorNames = field(default_factory=TensorNames)
    model_file: str = MODEL_FILE
    data_file: str = DATA_FILE

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ToolkitError(f"export target must be one of {TARGETS}, got {self.target!r}: re-export the model")
        if self.padding not in PADDINGS:
            raise ToolkitError(f"export padding must be one of {PADDINGS}, got {self.padding!r}: re-export the model")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ToolkitError(f"cache dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        texts = {"model_type": self.model_type, "weights": self.weights, "model_file": self.model_file,
                 "data_file": self.data_file, **{k: v for k, v in vars(self.names).items() if v is not None}}
        wrong = [k for k, v in texts.items() if not isinstance(v, str) or not v]
        if wrong:
            raise ToolkitError(f"export description gives no text for {', '.join(wrong)}: re-export the model")
        templates = [k for k, v in vars(self.names).items() if k.startswith(("past_", "present_")) and not _template(v)]
        if templates:
            raise ToolkitError(f"export description's {', '.join(templates)} must name one tensor per layer with one "
                               "%d (e.g. 'present.%d.key'): re-export the model")
        if self.accuracy_level is not None and self.accuracy_level not in range(5):
            raise ToolkitError(f"export description gives accuracy_level {self.accuracy_level}; MatMulNBits takes "
                               "0..4: re-export the model")
        bad = [k for k, v in self.dimensions().items() if v < 1]
        if bad:
            raise ToolkitError(f"export description gives non-positive {', '.join(bad)}: re-export the model")
        ids = {"eos_token_id": self.eos_token_ids, "bos_token_id": (self.bos_token_id,),
               "pad_token_id": (self.pad_token_id,)}
        wrong = [f"{k} {i}" for k, v in ids.items() for i in v if i is not None and not 0 <= i < self.vocab_size]
        if wrong:
            raise ToolkitError(f"export description gives {', '.join(wrong)}, outside the vocabulary of "
                               f"{self.vocab_size}: re-export the model")

    def dimensions(self) -> dict[str, int]:
        """The sizes the graph must agree with (``artifact.check_graph`` compares them when a folder is opened)."""
        return {"num_layers": self.num_layers, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "context_length": self.context_length}

    @property
    def pad_or_eos(self) -> int:
        """The id written into unused batch positions (onnxruntime-genai wants one)."""
        return self.pad_token_id if self.pad_token_id is not None else (self.eos_token_ids or (0,))[0]

    # --- export.json ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        n = self.names
        eos: int | list[int] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        return {
            "format": FORMAT,
            "target": self.target,
            "model_file": self.model_file,
            "data_file": self.data_file,
            "model_type": self.model_type,
            "num_layers": self.num_layers, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
            "max_positions": self.context_length,
            "dtype": self.cache_dtype,
            "weights": self.weights,
            "accuracy_level": self.accuracy_level,
            "padding": self.padding,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "inputs": {"input_ids": n.input_ids, "attention_mask": n.attention_mask, "position_ids": n.position_ids,
                       "past_key": n.past_key, "past_value": n.past_value},
            "outputs": {"logits": n.logits, "next_token": n.next_token, "present_key": n.present_key,
                        "present_value": n.present_value},
            "kv_layout": f"[batch, num_kv_heads, seq, head_dim] {self.cache_dtype}",
            "past_present_share_buffer": self.share_buffer,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], source: Path | str) -> ExportContract:
        found = d.get("format") if isinstance(d, dict) else None
        if found != FORMAT:
            raise ToolkitError(
                f"{source}: export format {found!r} is not {FORMAT!r}, the one this toolkit reads: re-export the "
                "model with this toolkit (toolkit run with an onnx step)"
            )
        with _reading(source):
            inputs, outputs = d["inputs"], d["outputs"]
            names = TensorNames(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                position_ids=inputs.get("position_ids"), past_key=inputs["past_key"], past_value=inputs["past_value"],
                logits=outputs["logits"], next_token=outputs.get("next_token"), present_key=outputs["present_key"],
                present_value=outputs["present_value"],
            )
            return cls(
                target=d["target"], model_type=d["model_type"], num_layers=_int(d["num_layers"]),
                num_heads=_int(d["num_heads"]), num_kv_heads=_int(d["num_kv_heads"]), head_dim=_int(d["head_dim"]),
                hidden_size=_int(d["hidden_size"]), vocab_size=_int(d["vocab_size"]),
                context_length=_int(d["max_positions"]), eos_token_ids=_ids(d["eos_token_id"]),
                bos_token_id=_optional_int(d.get("bos_token_id")), pad_token_id=_optional_int(d.get("pad_token_id")),
                padding=d["padding"], weights=d["weights"], accuracy_level=_optional_int(d.get("accuracy_level")),
                cache_dtype=d["dtype"], share_buffer=_bool(d["past_present_share_buffer"]), names=names,
                model_file=d["model_file"], data_file=d["data_file"],
            )

    # --- onnxruntime-genai's genai_config.json --------------------------------------------------------
    def genai_config(self, genai_type: str) -> dict[str, Any]:
        """onnxruntime-genai's genai_config.json (decoder-only, greedy defaults); ``genai_type`` is the model
        type onnxruntime-genai's builder writes for the family (the architecture record knows it)."""
        n = self.names
        inputs = {"input_ids": n.input_ids, "attention_mask": n.attention_mask,
                  "past_key_names": n.past_key, "past_value_names": n.past_value}
        if n.position_ids:
            inputs["position_ids"] = n.position_ids
        eos: int | list[int] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        return {
            "model": {
                "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_or_eos,
                "context_length": self.context_length, "type": genai_type, "vocab_size": self.vocab_size,
                "decoder": {
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "filename": self.model_file, "head_size": self.head_dim, "hidden_size": self.hidden_size,
                    "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                    "num_hidden_layers": self.num_layers,
                    "inputs": inputs,
                    "outputs": {"logits": n.logits, "present_key_names": n.present_key,
                                "present_value_names": n.present_value},
                },
            },
            "search": {"do_sample": False, "max_length": self.context_length, "min_length": 0, "num_beams": 1,
                       "num_return_sequences": 1, "past_present_share_buffer": self.share_buffer,
                       "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                       "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                       "diversity_penalty": 0.0},
        }

    @classmethod
    def from_genai_config(cls, d: dict[str, Any], source: Path | str) -> ExportContract:
        """The adapter for folders onnxruntime-genai built (its builder's key names, one spelling each)."""
        with _reading(source):
            model, search = d["model"], d.get("search", {})
            dec = model["decoder"]
            inputs, outputs = dec["inputs"], dec["outputs"]
            names = TensorNames(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                position_ids=inputs.get("position_ids"), past_key=inputs["past_key_names"],
                past_value=inputs["past_value_names"], logits=outputs["logits"],
                present_key=outputs["present_key_names"], present_value=outputs["present_value_names"],
                next_token=None,  # onnxruntime-genai's builder writes logits only
            )
            return cls(
                target="ort", model_type=model["type"], num_layers=_int(dec["num_hidden_layers"]),
                num_heads=_int(dec["num_attention_heads"]), num_kv_heads=_int(dec["num_key_value_heads"]),
                head_dim=_int(dec["head_size"]), hidden_size=_int(dec["hidden_size"]),
                vocab_size=_int(model["vocab_size"]), context_length=_int(model["context_length"]),
                eos_token_ids=_ids(model["eos_token_id"]), bos_token_id=_optional_int(model.get("bos_token_id")),
                pad_token_id=_optional_int(model.get("pad_token_id")), padding="right", weights="unknown",
                share_buffer=_bool(search.get("past_present_share_buffer", True)), names=names,
                model_file=dec.get("filename", MODEL_FILE),
            )


@contextmanager
def _reading(source: Path | str) -> Iterator[None]:
    """Turn a missing key or a value of the wrong type into one line naming the file."""
    try:
        yield
    except ToolkitError as exc:  # the contract's own checks, said of the file that holds the values
        raise ToolkitError(f"{source}: {exc}") from None
    except KeyError as exc:
        raise ToolkitError(f"{source} does not give {exc.args[0]!r}: re-export the model") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ToolkitError(f"{source} has a malformed value ({exc}): re-export the model") from None


def _template(text: str) -> bool:
    try:
        return text % 0 != text % 1
    except (TypeError, ValueError):
        return False


def _bool(value: Any) -> bool:
    """A JSON boolean: ``bool("false")`` is True."""
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {str(value)[:40]!r}")
    return value


def _int(value: Any) -> int:
    """A JSON integer: ``int()`` would turn 2.7 into 2 and true into 1, a lie the graph then contradicts."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {str(value)[:40]!r}")
    return value


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(_int(v) for v in value) if isinstance(value, list | tuple) else (_int(value),)


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def description_file(folder: Path) -> Path:
    """The file ``read_contract`` reads: ``export.json`` (ours) or, for onnxruntime-genai's folders, ``genai_config.json``."""
    folder = Path(folder)
    for name in (EXPORT_FILE, GENAI_FILE):
        if (folder / name).is_file():
            return folder / name
    raise ToolkitError(f"{folder} has neither {EXPORT_FILE} nor {GENAI_FILE}: it is not an export folder "
                       "(export with `toolkit run` and an onnx step)")


def read_contract(folder: Path) -> ExportContract:
    """``export.json`` (ours) or, for folders onnxruntime-genai built, ``genai_config.json``."""
    path = description_file(folder)
    reader = ExportContract.from_json if path.name == EXPORT_FILE else ExportContract.from_genai_config
    return reader(read_json(path, "re-export the model"), path)
