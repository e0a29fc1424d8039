"""Token-length statistics of a dataset, for the histogram and the truncation warning.

Contract: ``length_stats(lengths, max_length)`` returns counts, mean and percentiles of the full
(untruncated) lengths, how many exceed ``max_length`` and by how much on average, and a sentence
that says it in words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LengthStats:
    count: int
    mean: float
    p50: int
    p90: int
    p95: int
    p99: int
    max: int
    max_length: int
    over: int
    mean_excess: float

    @property
    def summary(self) -> str:
        if self.count == 0:
            return "No examples."
        base = (f"{self.count} examples, median {self.p50} tokens, 95th percentile {self.p95}, "
                f"longest {self.max}.")
        if self.over:
            pct = 100 * self.over / self.count
            return (base + f" {self.over} ({pct:.1f}%) exceed the max length of {self.max_length} by "
                    f"{self.mean_excess:.0f} tokens on average and will be truncated.")
        return base + f" None exceed the max length of {self.max_length}."

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary}


def _pct(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def length_stats(lengths: list[int], max_length: int) -> LengthStats:
    s = sorted(lengths)
    over = [x - max_length for x in s if x > max_length]
    return LengthStats(
        count=len(s), mean=(sum(s) / len(s)) if s else 0.0,
        p50=_pct(s, 0.5), p90=_pct(s, 0.9), p95=_pct(s, 0.95), p99=_pct(s, 0.99), max=s[-1] if s else 0,
        max_length=max_length, over=len(over), mean_excess=(sum(over) / len(over)) if over else 0.0,
    )
