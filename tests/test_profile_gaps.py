"""The GPU profiler's gap analysis (bench.profile_step.idle_gaps) attributes idle compute-stream time correctly,
checked on a hand-made trace (the real one only exists on the GPU machine)."""

from bench.profile_step import idle_gaps


def _k(name, ts, dur, stream, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, "correlation": corr}}


def _r(name, ts, dur, corr=None):
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur,
            "args": {} if corr is None else {"correlation": corr}}


def test_idle_gaps_split_starved_and_waiting_time():
    trace = {"traceEvents": [
        _k("gemm", 0, 100, 7, 1), _r("cudaLaunchKernel", -5, 2, 1),
        # 400 us idle: the next launch came late because the host sat in a stream synchronize
        _r("cudaStreamSynchronize", 90, 450), _k("add", 500, 50, 7, 2), _r("cudaLaunchKernel", 541, 3, 2),
        # 200 us idle: for 20 us the host had not yet launched it, then a wait on another stream (a copy)
        _r("cudaLaunchKernel", 560, 10, 3), _k("attention", 750, 300, 7, 3),
        _k("small", 0, 10, 9, 4),  # another, less busy stream is ignored
    ]}
    g = idle_gaps(trace)
    assert g["stream"] == 7 and g["busy_us"] == 450 and g["span_us"] == 1050 and g["idle_us"] == 600
    causes = {c: (us, n) for c, us, n in g["causes"]}
    assert causes == {"starved: cudaStreamSynchronize": (400, 1), "starved: host busy (python)": (20, 1),
                      "waiting: before attention": (180, 1)}
    assert g["largest"][0][:2] == (400, "starved: cudaStreamSynchronize")
    assert g["largest"][1][:2] == (200, "waiting: before attention")


def test_idle_gaps_of_an_empty_trace():
    assert idle_gaps({"traceEvents": []})["idle_us"] == 0
