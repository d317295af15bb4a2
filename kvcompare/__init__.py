"""kvcompare: compare KV-cache eviction policies for causal language models under identical measurement."""

__version__ = "0.1.0"
