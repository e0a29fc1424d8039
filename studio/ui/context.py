"""What every tab shares: the run store, the event follower, the playground's model holder, defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.follow import Follower
from studio.playground import ModelHolder
from studio.paths import samples_dir
from studio.runs import RunStore


@dataclass
class UIContext:
    store: RunStore = field(default_factory=RunStore)
    follower: Follower = field(default_factory=Follower)
    holder: ModelHolder = field(default_factory=ModelHolder)
    default_preset: str = "tiny-demo"
    default_data: Path = field(default_factory=lambda: samples_dir() / "finance_alpaca.jsonl")
    timer_seconds: float = 1.0
