"""Shared setup for the Python tests.

Keras picks its backend and config directory when it is first imported, so both are set here,
at the top of the first file pytest imports, before anything can import keras: the numpy backend
(the one whose arithmetic reference.py mirrors) and a throwaway KERAS_HOME so tests neither read
nor write ~/.keras.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["KERAS_BACKEND"] = "numpy"
_KERAS_HOME = tempfile.mkdtemp(prefix="luong-keras-home-")
os.environ["KERAS_HOME"] = _KERAS_HOME
atexit.register(shutil.rmtree, _KERAS_HOME, ignore_errors=True)

# The test modules import the shared case matrix (attention_cases.py beside this file); make that
# work under any pytest import mode, not only the default "prepend".
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import attention_cases  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def keras():
    """The keras module, imported with the numpy backend."""
    import keras as keras_module

    assert keras_module.backend.backend() == "numpy", "keras was imported before conftest.py"
    return keras_module


@pytest.fixture
def make_keras_attention(keras):
    """Factory: a built `keras.layers.Attention` with the given config and weights.

    `make_keras_attention(use_scale=True, score_mode="concat", scale=0.37, concat_score_weight=1.7)`
    Weights left as None keep Keras's initial value 1.0.
    """
    return attention_cases.keras_attention_layer
