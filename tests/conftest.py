"""Pytest setup: keep Hugging Face libraries offline so no test ever reaches the hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is faster than two fighting over a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def single_threaded():
    """One BLAS/OpenMP thread for sklearn too: several threads on tiny problems only thrash a busy machine
    (sklearn and torch got 30x slower)."""
    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (2 layers, d_model 64, word-level tokenizer) on disk."""
    from helpers import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), arch="llama")
