"""What the machine offers: device, GPU name and memory, bf16 support, and memory readings.

Contract: every function works without a GPU (and without importing CUDA libraries eagerly); memory
readings are in bytes; ``memory_snapshot`` returns GPU numbers when CUDA is available, else process
RSS and system RAM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    gpu_count: int
    bf16: bool
    capability: tuple[int, int] | None = None  # CUDA compute capability, (7, 5) for a T4
    host_bytes: int = 0  # system RAM

    @property
    def sm(self) -> int:
        """Compute capability as one number (75 for a T4, 90 for an H100); 0 on a CPU."""
        return self.capability[0] * 10 + self.capability[1] if self.capability else 0

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30


def detect() -> Hardware:
    import psutil
    import torch

    host = psutil.virtual_memory().total
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, props.total_memory, torch.cuda.device_count(),
                        torch.cuda.is_bf16_supported(), (props.major, props.minor), host)
    return Hardware("cpu", "CPU", host, 0, True, None, host)


def resolve_dtype(name: str, hw: Hardware | None = None):
    """Map a config dtype name to a torch dtype; ``auto`` = bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    import torch

    hw = hw or detect()
    if name == "auto":
        if hw.device == "cpu":
            return torch.float32
        return torch.bfloat16 if hw.bf16 else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def memory_snapshot() -> dict:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        gpus = [{"index": i, "used": torch.cuda.device_memory_used(i),
                 "total": torch.cuda.get_device_properties(i).total_memory}
                for i in range(torch.cuda.device_count())]  # through NVML: no context on the other GPUs
        return {"device": "cuda", "gpus": gpus, "allocated": torch.cuda.memory_allocated(),
                "reserved": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_allocated(),
                "peak_reserved": torch.cuda.max_memory_reserved(),
                "used": total - free, "total": total}
    import psutil

    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    return {"device": "cpu", "rss": rss, "used": vm.total - vm.available, "total": vm.total}
