"""The model card written beside every exported graph, read by the server.

One pydantic model is the contract between training (which writes it) and serving (which reads it);
neither side keeps its own idea of the fields. It imports nothing heavier than pydantic.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
FORMAT_VERSION = 1

Cell = Literal["lstm", "gru", "rnn", "plstm"]  # plstm: the peephole LSTM (an ONNX LSTM node with input P)
InputForm = Literal["level", "seasonal", "lookback"]


class _Strict(BaseModel):
    # a score may be infinite or NaN (MASE over a constant series, a diverged loss): written as Infinity and NaN,
    # which json.loads reads back, not as null, which no float field takes
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class StateSpec(_Strict):
    """One recurrent state tensor: fed as `input`, returned as `output`, shape [dims[0], batch, dims[1]].

    Inputs and outputs are paired here explicitly, never by the order of their names.
    """

    input: str
    output: str
    dims: tuple[int, int]


class Scaler(_Strict):
    """Per-feature standardisation fitted on the training split only; applied inside the graph."""

    mean: list[float]
    std: list[float]
    diff_std: list[float] = []  # std of seasonal differences (seasonal input form)


class Score(_Strict):
    mae: float
    rmse: float
    smape: float  # percent, 0-200 scale
    mase: float
    mse: float | None = None  # in the data's units squared (absent in manifests before it was added)


class Evaluation(_Strict):
    """Rolling-origin scores on the test split for the model and its baselines."""

    split: str = "test"
    origins: int
    stride: int
    mase_season: int
    scores: dict[str, Score]  # forecaster name ("model", "naive", "seasonal_naive_48", ...) -> score
    # quantile level ("0.1") -> share of true values at or below that quantile forecast
    coverage: dict[str, float] = {}
    # "data": in the data's units; "z": each series' errors divided by its training std, then averaged
    # over the series (a global model over series of different scales)
    units: str = "data"


class DataFingerprint(_Strict):
    file: str
    sha256: str
    rows: int
    time_column: str
    first_time: str
    last_time: str
    train_rows: int
    validation_rows: int
    test_rows: int


class OnnxInfo(_Strict):
    file: str = ONNX_FILE
    sha256: str
    opset: int
    input: str = "x"
    output: str = "y"
    # with quantiles: an extra output [batch, horizon, targets, quantiles]; y stays the point forecast
    quantile_output: str | None = None


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(ge=1)
    cell: Cell
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    dropout: float = 0.0
    residual: bool = False
    features: list[str] = Field(min_length=1)  # column order of x; targets come first
    targets: list[str] = Field(min_length=1)  # column order of y
    horizon: int = Field(ge=1)
    context_length: int = Field(ge=1)
    input_form: InputForm = "level"  # "seasonal": fed differences to one season back, forecast relative to it
    season: int = Field(0, ge=0)
    quantiles: list[float] = []
    states: list[StateSpec] = Field(min_length=1)
    scaler: Scaler
    data: DataFingerprint
    evaluation: Evaluation
    onnx: OnnxInfo
    training: dict[str, float | int | str | bool] = {}
    created: datetime
    # seasons found in the data (rows); the reference forecast and the baselines use them
    seasons: list[int] = []
    # a global model (one graph over many series): the id column of its long-format file and the ids of
    # the series it was trained on
    series_column: str = ""
    series_ids: list[str] = []
    # the data's step as a pandas offset string ("30min", "1h", "1D"); "" when the time column is an index
    step: str = ""
    # scores on the validation split (what chose this model) beside the same baselines
    validation: Evaluation | None = None
    # False when the model did not beat the best naive baseline on validation; it is then published
    # with a warning in `warnings` and served all the same
    beats_baselines: bool = True
    warnings: list[str] = []
    # per epoch: train loss, validation loss, learning rate and pre-clip gradient norm
    history: list[dict[str, float]] = []

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.features[: len(self.targets)] != self.targets:
            raise ValueError(f"targets {self.targets} must be the first columns of features {self.features}")
        n = len(self.features)
        if len(self.scaler.mean) != n or len(self.scaler.std) != n:
            raise ValueError(f"scaler must have one mean and one std per feature ({n})")
        if bool(self.quantiles) != bool(self.onnx.quantile_output):
            raise ValueError("quantiles and onnx.quantile_output go together: both set or neither")
        if any(not 0 < q < 1 for q in self.quantiles) or self.quantiles != sorted(set(self.quantiles)):
            raise ValueError(f"quantiles must be increasing and inside (0, 1): {self.quantiles}")
        return self

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls.model_validate(json.loads((directory / MANIFEST_FILE).read_text()))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_VERSION_DIR = re.compile(r"[1-9][0-9]*")  # ASCII digits, no leading zero: one spelling per version


def version_dirs(model_dir: Path, odd: list[Path] | None = None) -> dict[int, Path]:
    """The version folders of one model, <repo>/<name>/<integer>/, by version (empty when there is no such
    model). Staging folders (".name") and other files are not versions, nor are folders whose names only
    read as numbers loosely ("0", "01", "²", "١"): "01" beside "1" would be two folders for one version, and
    int() refuses "²". Those are appended to `odd` when it is given, for the caller to warn about. Raises
    OSError when the model folder cannot be listed."""
    if not model_dir.is_dir():
        return {}
    found: dict[int, Path] = {}
    for p in model_dir.iterdir():
        if not p.is_dir():
            continue
        if _VERSION_DIR.fullmatch(p.name):
            found[int(p.name)] = p
        elif odd is not None and p.name.isdigit():
            odd.append(p)
    return found


def next_version(repo: Path, name: str) -> int:
    """The next integer version under repo/name (1 when there is none)."""
    return max(version_dirs(repo / name), default=0) + 1
