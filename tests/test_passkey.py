"""The passkey task: prompts of exact length with the needle where asked, scoring, and its rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest
import torch
from kvcompare_plugins.passkey import INSTRUCTION, NEEDLE, QUESTION, build_prompt, passkey_keys
from runs import retrieve, tiny_run

from kvcompare import models
from kvcompare.config import CacheConfig, ConfigError
from kvcompare.engine.executor import Executor
from kvcompare.plugins import get_registry
from kvcompare.run.runner import run
from kvcompare.task import TaskError
from kvcompare.testing import TINY_VOCAB, tiny_llama


@pytest.fixture(scope="module")
def encode(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    return lambda text: models.encode(tokenizer, text)


@pytest.mark.parametrize("length", [300, 517])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_has_the_exact_length_and_the_needle_at_its_depth(encode, length: int, depth: float) -> None:  # type: ignore[no-untyped-def]
    prompt = build_prompt(encode, length, depth, "48213")
    needle = encode(NEEDLE.format(key="48213"))
    assert len(prompt.tokens) == length
    assert list(prompt.tokens[prompt.needle_start : prompt.needle_end]) == needle
    assert list(prompt.tokens[-len(encode(QUESTION)) :]) == encode(QUESTION)
    instruction, question = encode(INSTRUCTION), encode(QUESTION)
    assert list(prompt.tokens[: len(instruction)]) == instruction
    budget = length - len(instruction) - len(needle) - len(question)  # filler tokens, before and after the needle
    assert abs((prompt.needle_start - len(instruction)) - depth * budget) <= 0.5
    assert prompt.answer == tuple(encode(" 48213"))


def test_bad_lengths_and_depths_are_refused(encode) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TaskError, match="passkey prompt needs at least"):
        build_prompt(encode, 20, 0.5, "12345")
    with pytest.raises(TaskError, match="from 0 to 1"):
        build_prompt(encode, 300, 1.5, "12345")


def test_keys_are_seeded_five_digit_numbers() -> None:
    keys = passkey_keys(0, 2048, 0.5, 4)
    assert keys == passkey_keys(0, 2048, 0.5, 4) and all(len(k) == 5 and k.isdigit() for k in keys)
    assert keys != passkey_keys(1, 2048, 0.5, 4) and keys != passkey_keys(0, 2048, 0.3, 4)
    assert len(set(keys)) == 4


@pytest.mark.parametrize("spec,limit", [("full", None), ("streaming", 24), ("h2o", 24), ("l2", 20)])
def test_exact_match_means_greedy_decoding_gives_the_answer(spec: str, limit: int | None) -> None:
    """Feeding the answer one token at a time through the same evictions is what greedy decoding does while
    it is right: an answer equal to the greedy output is matched whole, one with a changed token is not."""
    executor = Executor(tiny_llama())
    tokens = torch.randint(0, TINY_VOCAB, (50,), generator=torch.Generator().manual_seed(11))
    config = CacheConfig(limit, 8, "shift", (0,))
    greedy = executor.generate(tokens, get_registry().build(spec), config, gen=5, warmup=0, prefill_chunk=8)
    answer = tuple(greedy.generated[:5])
    probe = build_prompt(lambda text: [1] * len(text.split()), 50, 0.5, "12345")  # shapes only
    probe = dataclasses.replace(probe, tokens=tuple(tokens.tolist()), answer=answer)
    right = retrieve(executor, probe, get_registry().build(spec), config, 8)
    assert right.correct and right.matched == 5 and right.logprob < 0
    wrong = dataclasses.replace(probe, answer=(*answer[:3], (answer[3] + 1) % TINY_VOCAB, answer[4]))
    missed = retrieve(executor, wrong, get_registry().build(spec), config, 8)
    assert not missed.correct and missed.matched == 3 and missed.logprob < right.logprob


def test_a_run_writes_passkey_rows_beside_the_ppl_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run(
        tiny_model_dir,
        policies=["streaming"],
        cache_sizes=[64],
        tasks=["ppl", "passkey"],
        lengths=[256],
        depths=[0.2, 0.8],
        stride=16,
    )
    run(config, tmp_path / "run", progress=False)
    rows = pl.read_parquet(tmp_path / "run" / "cells" / "*.parquet")
    assert set(rows["status"]) == {"ok"}
    ppl = rows.filter(pl.col("task") == "ppl")
    passkey = rows.filter(pl.col("task") == "passkey")
    assert ppl.height == 2 and ppl["probe_params"].null_count() == 2 and ppl["ppl"].null_count() == 0
    assert set(ppl["task_params"]) == {"{}"}
    depths = [json.loads(params)["depth"] for params in passkey["probe_params"]]
    assert passkey.height == 4 and sorted(set(depths)) == [0.2, 0.8]
    assert {json.loads(params)["depths"] == [0.2, 0.8] for params in passkey["task_params"]} == {True}
    assert passkey["correct"].null_count() == 0 and passkey["ppl"].null_count() == 4
    assert (passkey["answer_tokens"] == len(models.encode(models.load_tokenizer(str(tiny_model_dir)), " 12345"))).all()
    assert (passkey["answer_logprob"] < 0).all() and (passkey["seq_len"] == 256).all()
    assert (passkey["score"] == passkey["answer_matched"] / passkey["answer_tokens"]).all()


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"tasks": ["ppl", "passkee"]}, "unknown task 'passkee'. Did you mean 'passkey'"),
        ({"tasks": ["passkey:depths=0.2/x"]}, "passkey: depths='x' is not a valid float"),
        ({"tasks": ["passkey"], "depths": [1.2]}, "--depths"),
    ],
)
def test_bad_tasks_are_refused_before_measuring(
    tiny_model_dir: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(tiny_run(tiny_model_dir, **changes), tmp_path / "run", progress=False)


def test_a_text_haystack_hides_the_needle_in_that_text(encode) -> None:  # type: ignore[no-untyped-def]
    text = encode("It was the best of times, it was the worst of times, it was the age of wisdom.")
    prompt = build_prompt(encode, 300, 0.4, "55555", filler=text, haystack="dickens@0")
    instruction = len(encode(INSTRUCTION))
    assert len(prompt.tokens) == 300 and prompt.haystack == "dickens@0"
    before = prompt.tokens[instruction : prompt.needle_start]
    assert list(before) == (text * 10)[: len(before)]  # the text, repeated where it is short, up to the needle
    after = prompt.tokens[prompt.needle_end : -len(encode(QUESTION))]
    assert list(after) == (text * 10)[len(before) : len(before) + len(after)]  # and on after it


def test_a_run_with_a_text_haystack_names_the_text_of_each_probe(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_run(
        tiny_model_dir, tasks=["passkey"], lengths=[200], depths=[0.5], samples=[2], haystack="text", cache_sizes=[64]
    )
    run(config, tmp_path / "run", progress=False)
    rows = pl.read_parquet(tmp_path / "run" / "cells" / "*.parquet")
    assert set(rows["task"]) == {"passkey"} and rows.height == 2 * 2  # full and recent, two keys
    sources = set(rows["source"])
    assert len(sources) == 2 and all("tiny_corpus" in source and "@" in source for source in sources)


def sentencepiece_like_tokenizer() -> object:
    """A tokenizer that behaves as Llama-2's SentencePiece one: a dummy "▁" prefix on every text encoded, so
    " 12345" alone starts with two "▁" pieces, but after "is" with one; digits one by one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (Path(__file__).parent / "data" / "tiny_corpus.txt").read_text() + " The pass key is 12345." * 3
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("▁", behavior="merged_with_next"), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_the_answer_is_the_tokens_the_model_would_produce_after_the_question() -> None:
    from kvcompare_plugins.passkey import QUESTION

    tokenizer = sentencepiece_like_tokenizer()

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    prompt = build_prompt(encode, 200, 0.5, "12345")
    in_context = encode(QUESTION + " 12345")[len(encode(QUESTION)) :]
    assert prompt.answer == tuple(in_context)
    pieces = tokenizer.convert_ids_to_tokens(list(prompt.answer))  # type: ignore[attr-defined]
    assert pieces == ["▁", "1", "2", "3", "4", "5"]
    assert tuple(encode(" 12345")) != prompt.answer  # alone: an extra "▁", which the model would never emit


def bos_tokenizer(adds: bool) -> object:
    """The tiny BPE tokenizer with a BOS token, added to every encoded document or not."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = (Path(__file__).parent / "data" / "tiny_corpus.txt").read_text()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, special_tokens=["<s>"], show_progress=False)
    if adds:
        bpe._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>")


def test_passages_and_prompts_start_as_the_tokenizer_starts_a_document() -> None:
    from kvcompare.corpus import load_corpus, sample_passages
    from kvcompare.models import ModelError, document_start

    adds, plain = bos_tokenizer(True), bos_tokenizer(False)
    assert document_start(adds, "auto") == 0 and document_start(plain, "auto") is None
    assert document_start(plain, "always") == 0 and document_start(adds, "never") is None
    with pytest.raises(ModelError, match="has no BOS token"):
        document_start(object(), "always")  # a tokenizer without a BOS token

    def encode(text: str) -> list[int]:
        return list(plain(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    corpus = load_corpus(str(Path(__file__).parent / "data" / "tiny_corpus.txt"))
    without = sample_passages(corpus, encode, 48, 2, 0)
    with_bos = sample_passages(corpus, encode, 48, 2, 0, bos=0)
    for bare, started in zip(without, with_bos, strict=True):
        assert len(started.tokens) == 48 and started.tokens[0] == 0 and started.bos and not bare.bos
        assert (
            started.tokens[1:]
            == tuple(encode_all(corpus, encode, started.source))[started.token_offset : started.token_offset + 47]
        )
    prompt = build_prompt(encode, 200, 0.5, "12345", bos=0)
    assert len(prompt.tokens) == 200 and prompt.tokens[0] == 0 and prompt.bos
    assert prompt.tokens[prompt.needle_start : prompt.needle_end] == tuple(
        encode(" The pass key is 12345. Remember it. 12345 is the pass key.")
    )


def encode_all(corpus: object, encode: object, source: str) -> list[int]:
    document = next(d for d in corpus.documents() if d.source == source)  # type: ignore[attr-defined]
    return encode(document.text)  # type: ignore[operator,no-any-return]


def test_rows_say_whether_a_passage_starts_with_bos(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kvcompare.run.runner import run

    out = run(tiny_run(tiny_model_dir, repeats=1), tmp_path / "run", progress=False)
    assert pl.read_parquet(out / "cells" / "*.parquet")["bos"].to_list() == [False, False]  # it adds none
    with pytest.raises(models.ModelError, match="--bos always: the tokenizer has no BOS token"):
        run(tiny_run(tiny_model_dir, bos="always"), tmp_path / "always", progress=False)
