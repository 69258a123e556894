"""Fixtures the CUDA tests share."""
import pytest

from tests.helpers import write_llama


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory):
    """A random Llama small enough for a step in milliseconds, with grouped KV heads and room for 2048 positions."""
    return write_llama(tmp_path_factory.mktemp("small_llama"), hidden_size=256, intermediate_size=512,
                       num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                       max_position_embeddings=2048, initializer_range=0.1, seed=21)
