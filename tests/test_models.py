"""Model loading: local folders, and clear errors for what cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcompare.models import ModelError, load_model, resolve_device
from kvcompare.rope import UnsupportedModelError


def test_a_local_folder_loads_with_its_tokenizer(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), "cpu", "bfloat16")
    assert loaded.info["architecture"] == "LlamaForCausalLM" and loaded.info["num_layers"] == 4
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert len(loaded.encode("the of and")) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has cuda")
def test_an_unavailable_device_says_what_to_use() -> None:
    with pytest.raises(ModelError, match="use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu")


def test_unknown_dtype_and_missing_files_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as here: no Hub, and no retries
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("x", dtype="int8")
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="Hub may be unreachable"):
        load_model("no-such-org/no-such-model-kvcompare")


def test_a_model_without_rope_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        load_model(str(tmp_path))
