"""Training configuration: one pydantic model, filled from a TOML or YAML file and then from flags."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gatecast.manifest import Cell as CellName

from .data import DataError, FillPolicy

InputFormName = Literal["auto", "level", "seasonal", "lookback"]
LossName = Literal["mse", "mae"]


class TrainConfig(BaseModel):
    """Every training setting. `None` means "found from the data": the CLI only needs --data and --horizon."""

    model_config = ConfigDict(extra="forbid")

    # data
    data: Path | None = Field(
        None,
        description="CSV or Parquet file with a time column and value columns"
        " (default: none, required here or in the config)",
    )
    time_column: str | None = Field(None, description="the time column (default: the first column of timestamps)")
    time_index: bool = Field(False, description="the time column is an integer row index, one step per row")
    targets: list[str] | None = Field(None, description="target columns (default: the only numeric column)")
    covariates: list[str] = Field(default_factory=list, description="input-only columns known up to the present")
    series_column: str | None = Field(
        None,
        description="long format: the column naming each series; one global model is trained over all"
        " (default: none, wide format)",
    )
    fill: FillPolicy = Field("error", description="missing values: error, ffill, interpolate or zero")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="share of rows in the validation split")
    test_fraction: float = Field(
        0.15, ge=0, lt=1, description="share of rows in the test split; 0 trains on everything (production)"
    )
    val_start: str | None = Field(
        None, description="first timestamp (or row) of the validation split (default: from val_fraction)"
    )
    test_start: str | None = Field(
        None, description="first timestamp (or row) of the test split (default: from test_fraction)"
    )
    # windows
    context: int | None = Field(None, ge=1, description="window length in rows (default: what the form needs)")
    horizon: int | None = Field(None, ge=1, description="rows forecast (required: no default)")
    train_stride: int | None = Field(
        None, ge=1, description="rows between training windows (default: about max_train_windows windows)"
    )
    # model
    form: InputFormName = Field("auto", description="input form; auto compares them on validation")
    # lstm: torch's CPU LSTM trains about 7x faster than its GRU at the same size
    cell: CellName = Field("lstm", description="recurrent cell (plstm: an LSTM with peephole connections)")
    hidden_size: int = Field(32, ge=1, description="hidden units per layer")
    layers: int = Field(1, ge=1, description="stacked recurrent layers")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout between layers and before the head")
    residual: bool = Field(False, description="residual connections between stacked layers")
    forget_bias: float = Field(
        0.0,
        description="initial forget-gate bias (lstm) or update-gate bias (gru; > 0 keeps the state), e.g. 1.0;"
        " 0 keeps torch's initialisation; not for rnn",
    )
    relative: bool = Field(True, description="level form: forecast relative to the last observed value")
    season: int = Field(0, ge=0, description="> 0: seasonal input form with this season (rows)")
    extra_seasons: list[int] = Field(default_factory=list, description="seasonal form: more seasonal differences")
    lookback: int = Field(0, ge=0, description="lookback form: rows of the linear map (0: chosen on validation)")
    level_input: bool = Field(True, description="also feed standardised levels, not only differences")
    recent: int = Field(0, ge=0, description="seasonal form: linear skip from the last N seasonal differences")
    quantiles: list[float] = Field(default_factory=list, description="quantile outputs trained with pinball loss")
    # optimisation
    loss: LossName = Field("mse", description="point loss, in standardised units")
    batch_size: int = Field(64, ge=1, description="windows per optimisation step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    schedule: Literal["cosine", "plateau", "none"] = Field("cosine", description="learning-rate schedule")
    max_epochs: int = Field(30, ge=1, description="epoch limit per candidate")
    patience: int = Field(6, ge=1, description="epochs without validation improvement before stopping")
    clip_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this")
    clip_value: float | None = Field(None, gt=0, description="clip each gradient value to this (default: none)")
    tbptt: int = Field(
        0,
        ge=0,
        description="truncated BPTT: train through the training split in consecutive chunks of this many rows,"
        " the state carried (detached) from chunk to chunk as in a session; 0: independent windows",
    )
    tbptt_streams: int = Field(
        16, ge=1, description="truncated BPTT: parallel streams (one batch), each walking its own stretch of the split"
    )
    ema_decay: float = Field(0.0, ge=0, lt=1, description="> 0: keep an EMA of the weights, validate and export it")
    seed: int = Field(0, description="random seed")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice)")
    budget_s: float = Field(120.0, gt=0, description="wall-clock seconds for choosing and training the model")
    tune: int = Field(0, ge=0, description="Optuna trials over the search space (0: the fixed candidates)")
    max_train_windows: int = Field(4000, ge=1, description="the default train stride keeps about this many windows")
    max_val_windows: int = Field(1000, ge=1, description="validation windows scored after each epoch (evenly spread)")
    # evaluation
    eval_stride: int | None = Field(None, ge=1, description="rows between test origins (default: from the data)")
    seasons: list[int] | None = Field(None, description="seasons for the baselines (default: found in the data)")
    plot_windows: int = Field(4, ge=0, description="test windows drawn in forecast.png")
    # output
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="model name (default: the data file's stem)"
    )
    repo: Path = Field(Path("models"), description="model repository folder")
    progress: bool = Field(True, description="progress bar with the loss")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.seasons is not None and any(m < 1 for m in self.seasons):
            raise ValueError("seasons must be positive")
        if self.forget_bias and self.cell == "rnn" and not self.tune:
            raise ValueError("forget_bias needs a gated cell (lstm or gru): a plain RNN has no forget gate")
        if self.season and self.lookback:
            raise ValueError("season (seasonal form) and lookback (lookback form) exclude each other")
        if any(not 0 < q < 1 for q in self.quantiles):
            raise ValueError(f"quantiles must lie strictly between 0 and 1: {self.quantiles}")
        if self.form == "auto" and (self.season or self.lookback):
            self.form = "seasonal" if self.season else "lookback"
        self.quantiles = sorted(set(self.quantiles))
        if self.form == "seasonal" and not self.season:
            raise ValueError("form seasonal needs --input-season S")
        return self

    @property
    def model_name(self) -> str:
        """The name given, else the data file's stem made safe for the repository."""
        if self.name:
            return self.name
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.data.stem if self.data else "model").strip("-.") or "model"
        return stem[:64]


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
