"""Load: scoring 20k texts and NLL of 5k texts stream in bounded memory, with progress bars.

Each workload runs in a fresh process (tests/reliability/driver.py `load`) that resets its peak RSS after loading
the model and the texts, so the figures are the work's own. Memory must not grow with the number of texts: the
peak growth for N texts stays under a fixed bound and within a small margin of the growth for N / 10 texts.
Slow (minutes of CPU with the default model): run with CPWB_RELIABILITY_SLOW=1 (make test-reliability).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.reliability.jobs import job_args

MiB = 1024  # KiB per MiB
# name -> (driver arguments, texts, peak RSS growth bound in MiB, allowed extra growth over N / 10 texts in MiB)
LOADS = {
    "toxicity scores, 20k texts, default BiLSTM": ({"what": "score"}, 20_000, 256, 32),
    # The NLL engine's chunked LM head holds at most 2**25 logits (128 MiB fp32) and their log-softmax at a time.
    "NLL, 5k texts, default SmolLM2-135M": ({"what": "nll", "model": "default"}, 5_000, 768, 64),
}


@pytest.mark.reliability_slow
@pytest.mark.parametrize("args, n, bound_mib, margin_mib", LOADS.values(), ids=LOADS.keys())
def test_many_texts_stream_in_bounded_memory_with_progress(tmp_path, start_job, args, n, bound_mib, margin_mib):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    growth = {}
    for count in (n // 10, n):
        result = tmp_path / f"{count}.json"
        log = start_job("load", job_args(**args, n=count, result=result)).finish()
        assert re.search(r"100%\|[^|]*\| (\d+)/\1 ", log), log[-1000:]  # a tqdm bar ran to its end
        figures = json.loads(result.read_text())
        assert figures["n"] == count and figures["finite"]
        growth[count] = (figures["peak_kib"] - figures["rss_before_kib"]) / MiB
        print(f"{count} texts: RSS before {figures['rss_before_kib'] / MiB:.0f} MiB, peak growth "
              f"{growth[count]:.0f} MiB, {figures['seconds']:.1f} s")
    assert growth[n] < bound_mib, growth
    assert growth[n] - growth[n // 10] < margin_mib, growth
