from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "values")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class ForecastRequest(_message.Message):
    __slots__ = ("model", "version", "series")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    series: _containers.RepeatedCompositeFieldContainer[Matrix]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., series: _Optional[_Iterable[_Union[Matrix, _Mapping]]] = ...) -> None: ...

class ForecastResponse(_message.Message):
    __slots__ = ("model", "version", "forecasts", "quantiles", "quantile_forecasts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORECASTS_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FORECASTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    forecasts: _containers.RepeatedCompositeFieldContainer[Matrix]
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    quantile_forecasts: _containers.RepeatedCompositeFieldContainer[Matrix]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., forecasts: _Optional[_Iterable[_Union[Matrix, _Mapping]]] = ..., quantiles: _Optional[_Iterable[float]] = ..., quantile_forecasts: _Optional[_Iterable[_Union[Matrix, _Mapping]]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("model", "version", "history")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    history: Matrix
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., history: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "model", "version", "next_sequence", "forecast", "history_rows", "context_length", "short_history", "quantile_forecast")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FORECAST_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ROWS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHORT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FORECAST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    next_sequence: int
    forecast: Matrix
    history_rows: int
    context_length: int
    short_history: bool
    quantile_forecast: Matrix
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., next_sequence: _Optional[int] = ..., forecast: _Optional[_Union[Matrix, _Mapping]] = ..., history_rows: _Optional[int] = ..., context_length: _Optional[int] = ..., short_history: _Optional[bool] = ..., quantile_forecast: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class ObserveRequest(_message.Message):
    __slots__ = ("session_id", "sequence", "rows")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    rows: Matrix
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., rows: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class ObserveResponse(_message.Message):
    __slots__ = ("session_id", "sequence", "forecast", "quantile_forecast")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FORECAST_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FORECAST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    forecast: Matrix
    quantile_forecast: Matrix
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., forecast: _Optional[_Union[Matrix, _Mapping]] = ..., quantile_forecast: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("session_id", "sequence", "forecast", "error", "quantile_forecast")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FORECAST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FORECAST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    forecast: Matrix
    error: StreamError
    quantile_forecast: Matrix
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., forecast: _Optional[_Union[Matrix, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., quantile_forecast: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class ObserveBatchRequest(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[ObserveRequest]
    def __init__(self, steps: _Optional[_Iterable[_Union[ObserveRequest, _Mapping]]] = ...) -> None: ...

class ObserveBatchResponse(_message.Message):
    __slots__ = ("results", "error")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StreamResponse]
    error: StreamError
    def __init__(self, results: _Optional[_Iterable[_Union[StreamResponse, _Mapping]]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session_id", "steps")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    steps: int
    def __init__(self, session_id: _Optional[str] = ..., steps: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ForecastScore(_message.Message):
    __slots__ = ("forecaster", "mae", "rmse", "smape", "mase")
    FORECASTER_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    RMSE_FIELD_NUMBER: _ClassVar[int]
    SMAPE_FIELD_NUMBER: _ClassVar[int]
    MASE_FIELD_NUMBER: _ClassVar[int]
    forecaster: str
    mae: float
    rmse: float
    smape: float
    mase: float
    def __init__(self, forecaster: _Optional[str] = ..., mae: _Optional[float] = ..., rmse: _Optional[float] = ..., smape: _Optional[float] = ..., mase: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "is_default", "cell", "layers", "hidden_size", "features", "targets", "context_length", "horizon", "provider", "test_metrics", "mase_season", "input_form", "created", "onnx_sha256", "live_sessions", "warnings", "beats_baselines", "quantiles", "validation_metrics", "step", "seasons")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    MASE_SEASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORM_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ONNX_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    BEATS_BASELINES_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_METRICS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEASONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    is_default: bool
    cell: str
    layers: int
    hidden_size: int
    features: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedScalarFieldContainer[str]
    context_length: int
    horizon: int
    provider: str
    test_metrics: _containers.RepeatedCompositeFieldContainer[ForecastScore]
    mase_season: int
    input_form: str
    created: str
    onnx_sha256: str
    live_sessions: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    beats_baselines: bool
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    validation_metrics: _containers.RepeatedCompositeFieldContainer[ForecastScore]
    step: str
    seasons: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., is_default: _Optional[bool] = ..., cell: _Optional[str] = ..., layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[str]] = ..., context_length: _Optional[int] = ..., horizon: _Optional[int] = ..., provider: _Optional[str] = ..., test_metrics: _Optional[_Iterable[_Union[ForecastScore, _Mapping]]] = ..., mase_season: _Optional[int] = ..., input_form: _Optional[str] = ..., created: _Optional[str] = ..., onnx_sha256: _Optional[str] = ..., live_sessions: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., beats_baselines: _Optional[bool] = ..., quantiles: _Optional[_Iterable[float]] = ..., validation_metrics: _Optional[_Iterable[_Union[ForecastScore, _Mapping]]] = ..., step: _Optional[str] = ..., seasons: _Optional[_Iterable[int]] = ...) -> None: ...
