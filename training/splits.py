"""The train / validation / test split from the flags `gatecast train` and `gatecast evaluate` share.
Torch-free, so `gatecast evaluate` stays light."""

from __future__ import annotations

from .data import DataError, Series, Split, split_rows


def resolve_split(
    series: Series,
    context: int,
    horizon: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    val_start: str | None = None,
    test_start: str | None = None,
) -> Split:
    """split_rows, plus `test_fraction == 0`: no test split, for training on everything (production) once
    the evaluation is done; validation is then the last `val_fraction` of the rows."""
    if test_fraction == 0 and test_start is None and val_start is None:
        n = series.rows
        train_end = int(n * (1 - val_fraction))
        if train_end < context + horizon or n - train_end < horizon:
            raise DataError(f"{series.path}: too few rows ({n}) for context {context} + horizon {horizon}")
        return Split(train_end=train_end, val_end=n, rows=n)
    return split_rows(series, context, horizon, val_fraction, test_fraction, val_start, test_start)
