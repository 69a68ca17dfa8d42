"""Shared fixtures: the real default model loaded once per session, and a tiny random-init model for plumbing."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_lm():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (converted into the cache on first use)."""
    from cpwb.engine.assets import load_causal_lm, load_tokenizer

    return load_causal_lm("default"), load_tokenizer("default")


def make_tiny_lm(tokenizer, seed: int = 0):
    """A 2-layer random-init Llama sized for `tokenizer`: fast plumbing tests on a real architecture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_lm(default_lm):
    """A tiny random Llama with the default tokenizer, shared by the session: tests must not modify it."""
    return make_tiny_lm(default_lm[1]), default_lm[1]


@pytest.fixture
def fresh_tiny_lm(default_lm):
    """A tiny random Llama of this test's own, free to be trained or wrapped."""
    return make_tiny_lm(default_lm[1]), default_lm[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The notebook chain first: under `pytest -n 2` (make test) the longest test starts at once beside the rest."""
    items.sort(key=lambda item: "notebook" not in item.keywords)
