"""What a reader is configured with: its plan, features, augmentation, output, error policy and buffers."""

from __future__ import annotations

from dataclasses import dataclass, field

from hdfs_io.reader.planner import PlanConfig
from hdfs_io.speech.augmentation import AugmentConfig
from hdfs_io.speech.features import FeatureConfig


@dataclass(frozen=True)
class ReaderConfig:
    plan: PlanConfig = field(default_factory=PlanConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # off by default: evaluation never has it
    output: str = "features"  # "features": normalized features on the CPU; "waveform": for on-device features
    on_error: str = "fail"  # or "skip"
    prefetch_chunks: int = 4
    max_held_chunks: int = 32  # chunks kept between uses; past it one is dropped and read again when needed
    retry_seconds: float = 60.0  # how long a failing read is retried, with backoff, before StorageUnavailable
    stall_seconds: float = 120.0  # how long a read may hang (beyond retry_seconds) before StorageUnavailable
    use_feature_cache: bool = True  # read features-<digest>/ instead of decoding, when it matches `feature`
    decode_ahead: bool = True  # decode the next records on a thread, where a core is spare (reader.decode_ahead)

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {self.on_error!r}")
        if self.output not in ("features", "waveform"):
            raise ValueError(f"output must be 'features' or 'waveform', not {self.output!r}")
        if self.prefetch_chunks < 1 or self.max_held_chunks < 1:
            raise ValueError("prefetch_chunks and max_held_chunks must be at least 1")
        if self.retry_seconds < 0 or self.stall_seconds <= 0:
            raise ValueError("retry_seconds must be >= 0 and stall_seconds > 0")
