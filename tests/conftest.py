"""Shared fixtures: small synthetic data sets, so the suite stays fast on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest

import jaxdl


@pytest.fixture(scope="session")
def blobs() -> jaxdl.Splits:
    """3 well-separated classes in 20 dimensions: 512 / 128 / 128 examples."""
    return jaxdl.synthetic_splits(
        512, 128, 128, num_features=20, num_classes=3, seed=0, separation=6.0
    )


@pytest.fixture(scope="session")
def random_images() -> jaxdl.Dataset:
    """100 images of 784 uniform pixels with random labels: only memorisation fits them."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(100, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=100).astype(np.int32)
    return jaxdl.Dataset(x, y)
