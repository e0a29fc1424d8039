"""The GPUs users train on, as ``Hardware`` the planner can be asked about without owning the card.

Contract: ``PROFILES`` maps a short name to a ``studio.hardware.Hardware`` with the memory the driver reports
(not the box's nominal GB), the compute capability, bf16 support and the host RAM of the machine it usually
comes in (Colab for T4, L4 and A100 40 GB; cloud instances otherwise).  The fit table and the planner's tests use
them; a run always plans for the hardware it detects.
"""

from __future__ import annotations

from studio.hardware import Hardware

GiB = 2**30

PROFILES: dict[str, Hardware] = {
    "T4 16 GB": Hardware("cuda", "Tesla T4", int(15.0 * GiB), 1, False, (7, 5), int(12.7 * GiB)),
    "L4 24 GB": Hardware("cuda", "NVIDIA L4", int(22.5 * GiB), 1, True, (8, 9), int(53 * GiB)),
    "A100 40 GB": Hardware("cuda", "NVIDIA A100-SXM4-40GB", int(39.4 * GiB), 1, True, (8, 0), int(83 * GiB)),
    "A100 80 GB": Hardware("cuda", "NVIDIA A100-SXM4-80GB", int(79.2 * GiB), 1, True, (8, 0), int(167 * GiB)),
    "H100 80 GB": Hardware("cuda", "NVIDIA H100 80GB HBM3", int(79.1 * GiB), 1, True, (9, 0), int(200 * GiB)),
    "H200 141 GB": Hardware("cuda", "NVIDIA H200", int(139.8 * GiB), 1, True, (9, 0), int(128 * GiB)),
}
