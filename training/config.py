"""Training configuration: one pydantic model, filled from a TOML or YAML file and then from flags."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .data import DataError, FillPolicy
from .model import CellName


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # data
    data: Path = Path("data/taylor_halfhourly.csv")
    time_column: str | None = None
    targets: list[str] = Field(default_factory=lambda: ["demand_mw"], min_length=1)
    covariates: list[str] = []
    fill: FillPolicy = "error"
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    val_start: str | None = None
    test_start: str | None = None
    # windows
    context: int = Field(336, ge=1)
    horizon: int = Field(48, ge=1)
    train_stride: int = Field(1, ge=1)
    # model
    cell: CellName = "gru"
    hidden_size: int = Field(64, ge=1)
    layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    residual: bool = False
    relative: bool = True
    season: int = Field(0, ge=0, description="> 0: seasonal input form with this season (rows)")
    level_input: bool = True
    recent: int = Field(0, ge=0, description="seasonal form: linear skip from the last N seasonal differences")
    # optimisation
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "plateau", "none"] = "cosine"
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(6, ge=1)
    clip_norm: float | None = Field(1.0, gt=0)
    clip_value: float | None = Field(None, gt=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="> 0: keep an EMA of the weights, validate and export it")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    # evaluation
    eval_stride: int = Field(48, ge=1)
    seasons: list[int] = Field(default_factory=lambda: [48, 336], min_length=1)
    plot_windows: int = Field(4, ge=0)
    # output
    name: str = Field("taylor", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    repo: Path = Path("models")
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if any(m < 1 for m in self.seasons):
            raise ValueError("seasons must be positive")
        return self


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise DataError(f"{path}: config must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot parse: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: the config must be a table of settings")
    return raw


def build_config(file: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """File values first, then every flag that was given; errors name the offending setting."""
    values = read_config_file(file) if file else {}
    if file and "data" in values and not Path(values["data"]).is_absolute() and not Path(values["data"]).exists():
        values["data"] = str(file.parent / values["data"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise DataError(f"invalid training configuration: {problems}") from e
