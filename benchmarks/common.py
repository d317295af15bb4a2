"""Shared set-up of the benchmark scripts: the model, a book's first tokens, the policy registry."""

from __future__ import annotations

import argparse

import torch

from kvcompare.corpus import load_corpus
from kvcompare.engine.executor import Executor
from kvcompare.models import LoadedModel, load_model


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dataset", default="gutenberg")
    parser.add_argument("--book", default="austen-emma", help="source name inside the dataset")
    return parser


def setup(args: argparse.Namespace) -> tuple[LoadedModel, Executor]:
    loaded = load_model(args.model, args.device, args.dtype)
    return loaded, Executor(loaded.model)


def book_tokens(args: argparse.Namespace, loaded: LoadedModel, count: int) -> torch.Tensor:
    """The first ``count`` tokens of ``args.book``, looping the book if it is shorter."""
    corpus = load_corpus(args.dataset, include_all=True)
    text = next(d.text for d in corpus.documents() if d.source == args.book)
    ids = loaded.encode(text)
    while len(ids) < count:
        ids = ids + ids
    return torch.tensor(ids[:count], dtype=torch.long)
