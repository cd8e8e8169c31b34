"""jaxdl: compiled JAX training for studying deep feed-forward and convolutional nets.

The pure functions are the API: ``fit`` is a convenience built from ``init_state``,
``train_step`` and ``run_epoch``; every sweepable number is a traced array (``HParams``).
"""

from jaxdl import checkpoint, ensemble, processes, report, sweep
from jaxdl.config import RunConfig
from jaxdl.contract import Dropout, Hyperparameter, masked_widths
from jaxdl.data import Dataset, Splits, load, standardize, synthetic, synthetic_splits
from jaxdl.devices import use_cpu_cores
from jaxdl.models import CNN, MLP, sample_masks
from jaxdl.optim import Optimizer, make_optimizer
from jaxdl.report import params_digest
from jaxdl.step import Batch, HParams, Setup, TrainState, init_state, run_epoch, train_step
from jaxdl.stopping import EarlyStopping
from jaxdl.train import (
    FitInfo,
    NonFiniteError,
    best_epoch,
    evaluate,
    fit,
    make_hparams,
    predict,
    prepare,
)
from jaxdl.validate import InputError

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "MLP",
    "Batch",
    "Dataset",
    "Dropout",
    "EarlyStopping",
    "FitInfo",
    "HParams",
    "Hyperparameter",
    "InputError",
    "NonFiniteError",
    "Optimizer",
    "RunConfig",
    "Setup",
    "Splits",
    "TrainState",
    "best_epoch",
    "checkpoint",
    "ensemble",
    "evaluate",
    "fit",
    "init_state",
    "load",
    "make_hparams",
    "make_optimizer",
    "masked_widths",
    "params_digest",
    "predict",
    "prepare",
    "processes",
    "report",
    "run_epoch",
    "sample_masks",
    "standardize",
    "sweep",
    "synthetic",
    "synthetic_splits",
    "train_step",
    "use_cpu_cores",
]
