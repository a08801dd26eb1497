"""Typed training config: frozen dataclasses, read from YAML by one strict loader, with `--section.key=value` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hdfs_io.speech.augmentation import AugmentConfig
from hdfs_io.speech.features import FeatureConfig
from trainer.model import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"  # or "sgd" (Nesterov momentum 0.9)
    lr: float = 1.5e-3
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05
    grad_clip: float = 400.0
    batch_seconds: float = 60.0  # padded audio per batch per rank
    window_utterances: int = 2048  # the reader's shuffle buffer
    epochs: int = 1
    max_steps: int = 0  # > 0 stops early; also sets the LR schedule's length
    max_minutes: float = 0.0  # > 0 stops after this much wall time
    checkpoint_every_steps: int = 100
    eval_every_steps: int = 0  # > 0: rank 0 evaluates --eval-dataset this often (CER/WER curve)
    num_workers: int = 2  # DataLoader workers per rank
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or fp32, bf16, fp16
    inject_inf_at_step: int = -1  # fault injection for tests: make this step's loss Inf ...
    inject_inf_on_rank: int = 0  # ... on this rank
    crash_after_step: int = -1  # fault injection for tests: exit with code 17 after this step ...
    crash_on_rank: int = 0  # ... on this rank, as a killed process would (first attempt only under torchrun)
    inject_eval_utterance_delay_s: float = 0.0  # fault injection for tests: evaluating an utterance takes this longer
    dist_timeout_minutes: float = 30.0  # a collective (or the set-up after a restart) waiting longer fails the rank
    audit_keys: bool = False  # every rank appends the keys of each step to LOG_DIR/keys.rank<R>.jsonl
    on_error: str = "fail"  # a damaged record or chunk: "fail" stops with one line, "skip" drops it and counts it
    log_every_steps: int = 50  # without a terminal, rank 0 writes a progress line this often

    def __post_init__(self):
        for name, allowed in (("on_error", ("fail", "skip")), ("optimizer", ("adamw", "sgd")),
                              ("precision", ("auto", "fp32", "bf16", "fp16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training only: evaluation is never augmented


class ConfigError(ValueError):
    """The config file or an override names an unknown key or gives a bad value."""


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, type(default), f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(value: Any, kind: type, where: str):
    if kind is str and value is None:  # `--augment.noise=`: YAML reads nothing as null
        return ""
    if kind is tuple:  # a list of numbers (the only tuples configs hold)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {value!r} is not a list")
        return tuple(_coerce(v, float, where) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, str):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a {kind.__name__}") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {value!r} is not a {kind.__name__}")
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Returns the config from a YAML file (or defaults) with `section.key=value` overrides applied.

    Raises:
        ConfigError: an unknown key, a bad value, or a malformed override.
    """
    raw: dict = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} should look like --section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return _build(Config, raw, str(path or "config"))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    return _build(Config, values, "checkpoint config")
