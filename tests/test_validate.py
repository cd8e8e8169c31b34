"""Every bad input gets a clear error on the host, before anything is traced."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdl
from jaxdl import compiled, train, validate
from jaxdl.validate import InputError

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 6)).astype(np.float32)
Y = (np.arange(40) % 3).astype(np.int32)


def _fit(x=X, y=Y, *, model=None, opt=None, valid=None, **kw):
    model = model or jaxdl.MLP(hidden=(4,), num_classes=3)
    opt = opt or jaxdl.make_optimizer("sgd")
    kw.setdefault("epochs", 1)
    kw.setdefault("batch_size", 10)
    return jaxdl.fit(model, opt, jaxdl.Dataset(x, y), validation=valid, **kw)


def _nan_x():
    x = X.copy()
    x[3, 2] = np.nan
    return x


CASES = {
    "feature shape of validation": (
        lambda: _fit(valid=jaxdl.Dataset(X[:, :5], Y)),
        "validation x shape",
    ),
    "1-D features": (lambda: _fit(x=X[:, 0]), "train x shape"),
    "label too large": (
        lambda: _fit(y=np.where(Y == 2, 3, Y).astype(np.int32)),
        "expected labels in [0, 3)",
    ),
    "negative label": (lambda: _fit(y=(Y - 1).astype(np.int32)), "expected labels in [0, 3)"),
    "float labels": (lambda: _fit(y=Y.astype(np.float32)), "integer class labels"),
    "NaN inputs": (lambda: _fit(x=_nan_x()), "NaN/Inf"),
    "Inf inputs": (lambda: _fit(x=np.where(X > 2, np.inf, X).astype(np.float32)), "NaN/Inf"),
    "integer features": (lambda: _fit(x=(X * 10).astype(np.int32)), "floating dtype"),
    "x/y length mismatch": (lambda: _fit(y=Y[:-1]), "39 labels for 40 examples"),
    "batch larger than data": (lambda: _fit(batch_size=41), "batch_size"),
    "zero epochs": (lambda: _fit(epochs=0), "epochs"),
    "empty data": (lambda: _fit(x=X[:0], y=Y[:0]), "at least one example"),
    "unknown activation": (
        lambda: _fit(model=jaxdl.MLP(hidden=(4,), num_classes=3, activation="rleu")),
        "did you mean 'relu'",
    ),
    "unknown init": (
        lambda: _fit(model=jaxdl.MLP(hidden=(4,), num_classes=3, weight_init="xavier")),
        "init",
    ),
    "unknown optimizer": (lambda: jaxdl.make_optimizer("sgdm"), "optimizer"),
    "dropout 1.0": (lambda: _fit(dropout=1.0), "dropout"),
    "dropout negative": (lambda: _fit(dropout=[0.1, -0.2]), "dropout[1]"),
    "dropout wrong count": (lambda: _fit(dropout=[0.1, 0.2, 0.3]), "2 rate(s)"),
    "zero learning rate": (
        lambda: jaxdl.make_optimizer("adam", learning_rate=0.0),
        "learning_rate",
    ),
    "negative learning rate": (
        lambda: jaxdl.make_optimizer("sgd", learning_rate=-0.1),
        "learning_rate",
    ),
    "NaN learning rate": (
        lambda: jaxdl.make_optimizer("sgd", learning_rate=float("nan")),
        "learning_rate",
    ),
    "unknown loss": (lambda: _fit(loss="hinge"), "loss"),
    "negative l2": (lambda: _fit(l2=-1e-3), "l2"),
    "not an Optimizer": (lambda: _fit(opt=object()), "make_optimizer"),
    "early stopping without validation": (
        lambda: _fit(early_stopping=jaxdl.EarlyStopping()),
        "validation",
    ),
    "CNN on wrong image size": (lambda: _fit(model=jaxdl.CNN(num_classes=3)), "images"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_an_input_error_raised_before_tracing(case):
    call, expected = CASES[case]
    before = compiled._programs.cache_info().currsize
    with pytest.raises(InputError, match=None) as info:
        call()
    assert expected in str(info.value), str(info.value)
    assert compiled._programs.cache_info().currsize == before, (
        "nothing may be compiled for a bad input"
    )


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 12),
    f=st.integers(1, 4),
    classes=st.integers(2, 5),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    data=st.data(),
)
def test_check_data_property_refuses_exactly_the_bad_arrays(n, f, classes, dtype, data):
    """``check_data`` accepts an array iff it is non-empty, finite and its labels are in
    range; its error names the array at fault. Accepted data comes back as float32/int32
    with the same values."""
    x = np.asarray(data.draw(st.lists(st.floats(-1e3, 1e3), min_size=n * f, max_size=n * f)))
    x = x.reshape(n, f).astype(dtype)
    if n and data.draw(st.booleans(), label="poison"):
        i = data.draw(st.integers(0, x.size - 1), label="where")
        x.reshape(-1)[i] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
    y = np.asarray(data.draw(st.lists(st.integers(-2, classes + 1), min_size=n, max_size=n)))
    y = y.astype(np.int32)
    empty, nonfinite = n == 0, not np.isfinite(x).all()
    out_of_range = bool(n) and (y.min() < 0 or y.max() >= classes)
    if empty or nonfinite or out_of_range:
        with pytest.raises(InputError) as info:
            train.check_data(jaxdl.Dataset(x, y), "train", classes)
        assert str(info.value).startswith("train x" if empty or nonfinite else "train y")
    else:
        ds = train.check_data(jaxdl.Dataset(x, y), "train", classes)
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
        np.testing.assert_array_equal(ds.x, x.astype(np.float32))
        np.testing.assert_array_equal(ds.y, y)


def test_choice_suggests_nearest_and_lists_options():
    with pytest.raises(InputError, match=r"did you mean 'tanh'\?\); expected one of relu, tanh"):
        validate.choice("activation", "tnah", ["relu", "tanh"])


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)
