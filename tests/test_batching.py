"""The batch-size finder: halves on an injected out-of-memory error, keeps done work, records the size."""

import pytest
import torch

from boxprobe.behaviour.evaluate import EvalConfig, evaluate
from boxprobe.data.queries import prepare, resolve_spec
from boxprobe.data.task import TaskConfig, generate_sequences, sequence_examples
from boxprobe.models import batching
from boxprobe.models.batching import BatchSizer, OutOfMemoryAtBatchOne, find_batch_size, halve_on_oom, is_out_of_memory
from boxprobe.models.loading import load_model


def _oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_run_range_halves_reruns_only_the_failed_piece_and_settles():
    calls = []

    def fn(lo, hi):
        calls.append((lo, hi))
        if hi - lo > 3:
            raise _oom()
        return list(range(lo, hi))

    sizer = BatchSizer(16, "test")
    assert sizer.run_range(10, fn) == list(range(10))
    assert sizer.settled == 2 and sizer.halvings == 2  # 10 rows -> 5 -> 2
    assert calls[:3] == [(0, 10), (0, 5), (0, 2)]
    assert sizer.run_range(4, fn) == [0, 1, 2, 3] and calls[-2:] == [(0, 2), (2, 4)]  # the settled size sticks


def test_other_errors_are_not_retried_and_one_row_that_does_not_fit_says_what_to_do():
    with pytest.raises(ValueError):
        BatchSizer(4).run_range(4, lambda lo, hi: (_ for _ in ()).throw(ValueError("bad input")))
    with pytest.raises(OutOfMemoryAtBatchOne, match="device_map"):
        BatchSizer(4).run_range(4, lambda lo, hi: (_ for _ in ()).throw(_oom()))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_whole_function_forms():
    assert find_batch_size(lambda b: b if b <= 5 else (_ for _ in ()).throw(_oom()), 32) == (4, 4)

    @halve_on_oom("max_batch")
    def loop(n, max_batch=64):
        if max_batch > 10:
            raise _oom()
        return n * max_batch

    assert loop(2) == 16 and loop.last_batch_size == 8
    assert loop(2, max_batch=4) == 8 and loop.last_batch_size == 4


def test_evaluate_survives_injected_oom_with_the_same_results(monkeypatch):
    model = load_model("assets/models/toy-base", device="cpu")
    task = TaskConfig(num_samples=2, num_operations=1)
    examples = [e for s in generate_sequences(task) for e in sequence_examples(s, task)][:14]
    queries = prepare(model, examples, resolve_spec(model))
    reference = evaluate(model, queries, EvalConfig(method="fast", batch_size=8, progress=False))
    assert reference.summary["batch_size_settled"] == 8

    import boxprobe.behaviour.evaluate as ev

    real = ev.fast_batch
    sizes = []

    def flaky(model, chunks, *args):
        n = sum(map(len, chunks))
        sizes.append(n)
        if n > 3:
            raise _oom()
        return real(model, chunks, *args)

    monkeypatch.setattr(ev, "fast_batch", flaky)
    monkeypatch.setattr(batching, "free_memory", lambda: None)
    result = evaluate(model, queries, EvalConfig(method="fast", batch_size=8, progress=False))
    assert result.summary["batch_size_settled"] == 3 and max(sizes) == 7  # a batch holds one context of 7
    cols = ["sample_id", "num_operations", "box", "correct"]
    assert result.frame[cols].equals(reference.frame[cols])


def test_cache_survives_injected_oom_with_the_same_activations(tmp_path, monkeypatch):
    from boxprobe.activations import cache as cache_mod
    from boxprobe.activations.cache import CacheConfig, build_cache

    model = load_model("assets/models/toy-base", device="cpu")
    task = TaskConfig(num_samples=2, num_operations=1)
    examples = [e for s in generate_sequences(task) for e in sequence_examples(s, task)][:14]
    queries = prepare(model, examples, resolve_spec(model))
    cfg = CacheConfig(roles=("query_last", "box_mention"), batch_size=8)
    reference = build_cache(model, queries, tmp_path / "ref", cfg, progress=False)
    real = cache_mod._run_batch

    def flaky(model, items, *args):
        if len(items) > 3:
            raise _oom()
        return real(model, items, *args)

    monkeypatch.setattr(cache_mod, "_run_batch", flaky)
    monkeypatch.setattr(batching, "free_memory", lambda: None)
    result = build_cache(model, queries, tmp_path / "oom", cfg, progress=False)
    for role in cfg.roles:
        # other batch compositions (padding, prefix reuse) move float32 sums by ~1e-5; a row out of place would not
        torch.testing.assert_close(result.activations("resid_post", role), reference.activations("resid_post", role),
                                   atol=2e-4, rtol=1e-4)
        assert result.metadata(role).equals(reference.metadata(role))
