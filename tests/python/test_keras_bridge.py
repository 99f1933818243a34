"""`luong.keras.Attention` as a drop-in for `keras.layers.Attention`, and
`luong.Attention.from_keras`.

In this process Keras runs on the numpy backend (conftest.py); the JAX and torch backends, fixed
when Keras is imported, get one subprocess each (`test_jax_backend_trains_and_matches_keras_
gradients`, `test_torch_backend_trains_through_luong_torch_and_matches_keras_gradients`).
Outputs are compared with Keras's by attention_cases.py's float32 tolerance rule (the one
test_keras_parity.py uses); where both sides run luong's kernel they must agree bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from attention_cases import CONCAT_SCORE_WEIGHT, SCALE, assert_close, tolerance_for

import luong
import luong.keras

assert keras.backend.backend() == "numpy", "conftest.py sets KERAS_BACKEND=numpy"

CONFIGS = [
    {"use_scale": False, "score_mode": "dot"},
    {"use_scale": True, "score_mode": "dot"},
    {"use_scale": False, "score_mode": "concat", "dropout": 0.2, "seed": 3},
    {"use_scale": True, "score_mode": "concat"},
]


def _values(layer: Any) -> list[np.ndarray]:
    """The layer's weights as arrays (`get_weights()` trips a NumPy 2 DeprecationWarning inside
    Keras 3.15 on this backend, see test_config.py)."""
    return [np.asarray(w.value) for w in layer.weights]


def _set_test_weights(layer: Any) -> None:
    """The non-default weights of the parity tests (Keras's initial value is 1.0 for both)."""
    values = [SCALE] if layer.use_scale else []
    values += [CONCAT_SCORE_WEIGHT] if layer.score_mode == "concat" else []
    layer.set_weights([np.float32(x) for x in values])


def _effective(layer: Any) -> dict[str, Any]:
    """`scale` and `concat_score_weight` as the layer holds them (float32)."""
    return {
        "scale": float(np.asarray(layer.scale.value)) if layer.use_scale else None,
        "concat_score_weight": (
            float(np.asarray(layer.concat_score_weight.value))
            if layer.score_mode == "concat"
            else 1.0
        ),
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_layer_is_keras_in_everything_but_call(config: dict[str, Any]) -> None:
    ours = luong.keras.Attention(name="att", **config)
    theirs = keras.layers.Attention(name="att", **config)
    assert isinstance(ours, keras.layers.Attention)
    assert ours.get_config() == theirs.get_config()
    shapes = [(2, 3, 4), (2, 5, 6), (2, 5, 4)]
    for layer in (ours, theirs):
        layer.build(shapes)
    assert [(w.path, w.shape, w.trainable) for w in ours.weights] == [
        (w.path, w.shape, w.trainable) for w in theirs.weights
    ]
    assert all(np.asarray(w.value) == 1.0 for w in ours.weights)
    assert len(ours.weights) == int(config["use_scale"]) + int(config["score_mode"] == "concat")
    assert ours.supports_masking and theirs.supports_masking
    assert ours.compute_output_shape(shapes) == theirs.compute_output_shape(shapes) == (2, 3, 6)
    q_mask = np.array([[True, False, True]] * 2)
    inputs = [np.zeros(s, np.float32) for s in shapes]
    np.testing.assert_array_equal(ours.compute_mask(inputs, [q_mask, None]), q_mask)
    assert ours.compute_mask(inputs, None) is None
    again = luong.keras.Attention.from_config(ours.get_config())
    assert type(again) is luong.keras.Attention and again.get_config() == ours.get_config()
    with pytest.raises(ValueError, match="must be called on a list of inputs"):
        ours(inputs[0])


def _embedding_models(
    layer_cls: type, config: dict[str, Any], key: bool, causal: bool
) -> tuple[Any, Any]:
    """`(model, embeddings)`: query and value token inputs, each through
    `Embedding(mask_zero=True)` (plus a key embedding of the value tokens), into the attention
    layer; `embeddings` gives the attention's inputs."""
    q_tokens = keras.Input((None,), dtype="int32", name="q_tokens")
    v_tokens = keras.Input((None,), dtype="int32", name="v_tokens")
    q = keras.layers.Embedding(12, 6, mask_zero=True, name="q_emb")(q_tokens)
    v = keras.layers.Embedding(12, 6, mask_zero=True, name="v_emb")(v_tokens)
    inputs = [q, v]
    if key:
        inputs.append(keras.layers.Embedding(12, 6, mask_zero=True, name="k_emb")(v_tokens))
    attention = layer_cls(name="attention", **config)
    output = attention(inputs, use_causal_mask=causal)
    model = keras.Model([q_tokens, v_tokens], output)
    return model, keras.Model([q_tokens, v_tokens], inputs)


def _tokens(rng: np.random.Generator, batch: int, t: int) -> np.ndarray:
    """Token ids with trailing padding (0) of random length, at least one token per row."""
    tokens = rng.integers(1, 12, (batch, t))
    for row, n in zip(tokens, rng.integers(1, t + 1, batch)):
        row[n:] = 0
    return tokens


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("key", [False, True], ids=["nokey", "key"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_functional_model_with_embedding_masks_matches_keras(
    config: dict[str, Any], key: bool, causal: bool
) -> None:
    # The embeddings' initial weights come from Keras's generator: seeded, so a failure here
    # reproduces (unseeded, one run in many put one element 1.02x past the rounding bound).
    keras.utils.set_random_seed(len(config) + 2 * key + causal)
    ours, embeddings = _embedding_models(luong.keras.Attention, config, key, causal)
    theirs, _ = _embedding_models(keras.layers.Attention, config, key, causal)
    _set_test_weights(ours.get_layer("attention"))
    theirs.set_weights(_values(ours))
    rng = np.random.default_rng(len(config) + 2 * key + causal)
    tokens = [_tokens(rng, 4, 5), _tokens(rng, 4, 7)]
    output = ours.predict(tokens, verbose=0)
    keras_output = theirs.predict(tokens, verbose=0)

    # The implicit masks reached the layer: the output is luong's kernel on the embeddings with
    # those masks, bit for bit, and not what it gives without them.
    emb = embeddings.predict(tokens, verbose=0)
    query_mask, value_mask = tokens[0] != 0, tokens[1] != 0
    weights = _effective(ours.get_layer("attention"))
    call = {"score_mode": config["score_mode"], "use_causal_mask": causal, **weights}
    expected = luong.attention(*emb, query_mask=query_mask, value_mask=value_mask, **call)
    np.testing.assert_array_equal(output, expected, strict=True)
    assert not np.array_equal(output, luong.attention(*emb, **call))
    assert np.all(output[~query_mask] == 0)

    key_emb = emb[2] if key else None
    _, output_atol = tolerance_for(emb[0], emb[1], key_emb, config["score_mode"], **weights)
    assert_close("output vs Keras", output, keras_output, output_atol)


def test_direct_call_returns_keras_scores() -> None:
    rng = np.random.default_rng(7)
    q, v, k = (rng.standard_normal(s).astype(np.float32) for s in [(3, 4, 5), (3, 6, 2), (3, 6, 5)])
    mask = [rng.random((3, 4)) < 0.7, rng.random((3, 6)) < 0.7]
    mask[1][:, 0] = True  # no fully masked row (Keras's 1e9 bias: weights of the dtype's rounding)
    config = {"use_scale": True, "score_mode": "concat"}
    ours, theirs = luong.keras.Attention(**config), keras.layers.Attention(**config)
    ours.build([q.shape, v.shape, k.shape])
    theirs.build([q.shape, v.shape, k.shape])
    _set_test_weights(ours)
    _set_test_weights(theirs)
    call = {"mask": mask, "return_attention_scores": True, "use_causal_mask": True}
    output, scores = ours([q, v, k], **call)
    keras_output, keras_scores = theirs([q, v, k], **call)
    weights_atol, output_atol = tolerance_for(q, v, k, "concat", **_effective(ours))
    assert_close("output", output, keras_output, output_atol)
    assert_close("scores", scores, keras_scores, weights_atol)
    assert output.dtype == scores.dtype == np.float32


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    config = {"use_scale": True, "score_mode": "concat", "dropout": 0.1, "seed": 9}
    model, _ = _embedding_models(luong.keras.Attention, config, key=True, causal=False)
    _set_test_weights(model.get_layer("attention"))
    path = tmp_path / "model.keras"
    with warnings.catch_warnings():
        # Keras 3.15's numpy backend saves each variable with np.array(variable), which NumPy 2
        # flags (Variable.__array__ takes no `copy`), for every layer, Keras's own too
        warnings.filterwarnings(
            "ignore",
            message="__array__ implementation doesn't accept a copy keyword",
            category=DeprecationWarning,
        )
        model.save(path)
        loaded = keras.models.load_model(path)
    layer = loaded.get_layer("attention")
    assert type(layer) is luong.keras.Attention
    assert layer.get_config() == model.get_layer("attention").get_config()
    for a, b in zip(_values(loaded), _values(model)):
        np.testing.assert_array_equal(a, b, strict=True)
    assert np.float32(SCALE) in _values(layer)
    rng = np.random.default_rng(8)
    tokens = [_tokens(rng, 3, 4), _tokens(rng, 3, 6)]
    np.testing.assert_array_equal(
        loaded.predict(tokens, verbose=0), model.predict(tokens, verbose=0), strict=True
    )


def test_dropout_draws_luongs_masks_at_the_seed_generators_count() -> None:
    # The n-th training call uses luong's masks for (seed, call n): those of luong.Attention's
    # n-th training call with the same seed. The SeedGenerator counts the calls.
    rng = np.random.default_rng(9)
    q, v = rng.standard_normal((2, 5, 4)).astype(np.float32), rng.standard_normal((2, 6, 4))
    ours = luong.keras.Attention(use_scale=True, dropout=0.4, seed=11)
    reference = luong.Attention(use_scale=True, dropout=0.4, seed=11)
    ours.build([q.shape, v.shape])
    ours.set_weights([np.float32(SCALE)])
    reference.set_weights([np.float32(SCALE)])
    outputs = [ours([q, v], training=True) for _ in range(3)]
    for n, output in enumerate(outputs):
        np.testing.assert_array_equal(output, reference([q, v], training=True), err_msg=str(n))
    assert not np.array_equal(outputs[0], outputs[1])
    assert list(np.asarray(ours.seed_generator.state.value)) == [11, 3]
    np.testing.assert_array_equal(ours([q, v]), reference([q, v]), strict=True)  # no dropout
    assert list(np.asarray(ours.seed_generator.state.value)) == [11, 3]


def test_float64_layer_computes_in_float64() -> None:
    rng = np.random.default_rng(10)
    q, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    ours = luong.keras.Attention(use_scale=True, dtype="float64")
    output = ours([q, v])
    assert output.dtype == np.float64
    expected = luong.Attention(use_scale=True, dtype="float64")([q, v])
    np.testing.assert_array_equal(output, expected, strict=True)


@pytest.mark.parametrize("why", ["backend", "dtype"])
def test_falls_back_to_keras_where_luong_does_not_compute(
    why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another backend, or a compute dtype luong has no kernel for: Keras's own call runs.
    rng = np.random.default_rng(11)
    q, v = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 5, 4))
    ours, theirs = luong.keras.Attention(use_scale=True), keras.layers.Attention(use_scale=True)
    for layer in (ours, theirs):
        layer.build([q.shape, v.shape])
        _set_test_weights(layer)

    def no_luong(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("luong's kernel ran")

    monkeypatch.setattr(luong.keras._run, "run", no_luong)
    with pytest.raises(AssertionError, match="luong's kernel ran"):
        ours([q, v])  # numpy backend, float32: luong computes
    if why == "backend":
        monkeypatch.setattr(luong.keras, "LUONG_BACKENDS", ())
    else:
        monkeypatch.setattr(luong.keras, "_luong_dtype", lambda name: None)
    np.testing.assert_array_equal(ours([q, v]), theirs([q, v]), strict=True)


# ---------------------------------------------------------------------------------------------
# luong.Attention.from_keras


@pytest.mark.parametrize(
    "cls", [keras.layers.Attention, luong.keras.Attention], ids=["keras", "luong.keras"]
)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_from_keras_copies_config_and_weights(cls: type, config: dict[str, Any]) -> None:
    source = cls(name="source", **config)
    rng = np.random.default_rng(12)
    q, v = rng.standard_normal((2, 4, 3)).astype(np.float32), rng.standard_normal((2, 5, 3))
    n_weights = int(config["use_scale"]) + int(config["score_mode"] == "concat")
    unbuilt = luong.Attention.from_keras(source)
    assert [float(w) for w in unbuilt.get_weights()] == [1.0] * n_weights
    source.build([q.shape, v.shape])
    _set_test_weights(source)
    layer = luong.Attention.from_keras(source)
    assert layer.get_config() == {
        "name": "source",
        "trainable": True,
        "dtype": "float32",
        "use_scale": config["use_scale"],
        "score_mode": config["score_mode"],
        "dropout": config.get("dropout", 0.0),
        "seed": config.get("seed"),
    }
    assert len(layer.get_weights()) == len(_values(source)) == n_weights
    for a, b in zip(layer.get_weights(), _values(source)):
        np.testing.assert_array_equal(a, b, strict=True)
    weights_atol, output_atol = tolerance_for(
        q, v, None, config["score_mode"], **_effective(source)
    )
    assert_close("output", layer([q, v]), source([q, v]), output_atol)

    as_float64 = luong.Attention.from_keras(source, dtype="float64")
    assert as_float64.dtype == "float64"
    assert [w.dtype for w in as_float64.get_weights()] == [np.dtype(np.float64)] * n_weights


# ---------------------------------------------------------------------------------------------
# the JAX backend, in a subprocess

_JAX_SCRIPT = """
import json
import jax, jax.numpy as jnp, keras, numpy as np
import luong.keras

assert keras.backend.backend() == "jax"
report = {}
rng = np.random.default_rng(0)

# 1. model.fit trains scale, concat_score_weight and the embedding, under jit
tokens = keras.Input((None,), dtype="int32")
x = keras.layers.Embedding(16, 8, mask_zero=True)(tokens)
att = luong.keras.Attention(use_scale=True, score_mode="concat", name="attention")
y = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(att([x, x])))
model = keras.Model(tokens, y)
model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=True)
data = rng.integers(1, 16, (32, 6))
data[:, 4:] = 0
target = rng.standard_normal((32, 1)).astype("float32")
before = [np.asarray(w.value).copy() for w in model.weights]
history = model.fit(data, target, epochs=6, batch_size=32, verbose=0)
after = [np.asarray(w.value) for w in model.weights]
report["loss"] = history.history["loss"]
report["changed"] = {w.path: bool(np.any(a != b)) for w, a, b in zip(model.weights, before, after)}

# 2. predict (jit) equals keras.layers.Attention's model with the same weights
twin_att = keras.layers.Attention(use_scale=True, score_mode="concat", name="attention")
tx = keras.layers.Embedding(16, 8, mask_zero=True)(tokens)
twin = keras.Model(tokens, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(
    twin_att([tx, tx]))))
twin.set_weights([np.asarray(w.value) for w in model.weights])
a, b = model.predict(data, verbose=0), twin.predict(data, verbose=0)
report["predict_rel"] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

# 3. gradients through the stateless call equal keras.layers.Attention's
for mode in ("dot", "concat"):
    for causal in (False, True):
        ours = luong.keras.Attention(use_scale=True, score_mode=mode)
        theirs = keras.layers.Attention(use_scale=True, score_mode=mode)
        q = rng.standard_normal((3, 5, 4)).astype("float32")
        v = rng.standard_normal((3, 7, 2)).astype("float32")
        k = rng.standard_normal((3, 7, 4)).astype("float32")
        masks = [rng.random((3, 5)) < 0.7, rng.random((3, 7)) < 0.7]
        masks[1][:, 0] = True
        do = rng.standard_normal((3, 5, 2)).astype("float32")
        weights = [np.float32(0.37)] + ([np.float32(1.7)] if mode == "concat" else [])
        grads = []
        for layer in (ours, theirs):
            layer.build([q.shape, v.shape, k.shape])
            layer.set_weights(weights)

            def loss(trainable, q, v, k, layer=layer):
                out, _ = layer.stateless_call(
                    trainable, layer.non_trainable_variables, [q, v, k], mask=masks,
                    use_causal_mask=causal)
                return jnp.sum(do * out)

            trainable = [w.value for w in layer.trainable_variables]
            g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(trainable, q, v, k)
            grads.append({"query": g[1], "value": g[2], "key": g[3],
                          **{w.name: x for w, x in zip(layer.trainable_variables, g[0])}})
        report[f"grad_rel_{mode}_{causal}"] = {
            name: float(np.max(np.abs(grads[0][name] - want)) / np.max(np.abs(want)))
            for name, want in grads[1].items()
        }

# 4. a model saved on the JAX backend loads and predicts the same
model.save(KERAS_HOME + "/trained.keras")
loaded = keras.models.load_model(KERAS_HOME + "/trained.keras")
report["loaded_type"] = type(loaded.get_layer("attention")).__module__
report["loaded_equal"] = bool(np.array_equal(loaded.predict(data, verbose=0), a))

# 5. mixed_bfloat16: the layer computes in bfloat16 through luong, and the model trains
mixed = luong.keras.Attention(dtype="mixed_bfloat16", name="mixed")
qi, vi = keras.Input((6, 8)), keras.Input((7, 8))
mm = keras.Model([qi, vi], keras.layers.Dense(1)(mixed([qi, vi])))
mm.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=True)
xq = rng.standard_normal((32, 6, 8)).astype("float32")
xv = rng.standard_normal((32, 7, 8)).astype("float32")
ty = rng.standard_normal((32, 6, 1)).astype("float32")
report["mixed_loss"] = mm.fit([xq, xv], ty, epochs=6, batch_size=32, verbose=0).history["loss"]
out = mixed([xq, xv])
report["mixed_dtype"] = str(out.dtype)
bf = np.asarray(out).dtype
want = luong.attention(xq.astype(bf), xv.astype(bf), dtype="bfloat16")
report["mixed_equal"] = bool(np.array_equal(np.asarray(out), want))
print("REPORT" + json.dumps(report))
"""


def _run_on_backend(backend: str, script: str, tmp_path: Path) -> dict[str, Any]:
    """Runs `script` in a Python with Keras on `backend` (and KERAS_HOME in `tmp_path`, also
    as the script's global `KERAS_HOME`) and returns the JSON it printed after "REPORT"."""
    package = str(Path(luong.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "KERAS_HOME": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([package, os.environ.get("PYTHONPATH", "")]),
    }
    script = f"KERAS_HOME = {str(tmp_path)!r}\n" + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT"))
    report: dict[str, Any] = json.loads(line[len("REPORT") :])
    return report


def _assert_trained_and_keras_gradients(report: dict[str, Any]) -> None:
    """The scripts' shared parts: model.fit's loss fell and every weight moved, and the
    gradients of both score modes, causal or not, are Keras's within 2e-4 relative."""
    loss = report["loss"]
    assert loss[-1] < 0.8 * loss[0], loss
    changed = report["changed"]
    assert changed["attention/scale"] and changed["attention/concat_score_weight"], changed
    assert all(changed.values()), changed  # the embedding and the dense layer trained too
    for case in (f"grad_rel_{m}_{c}" for m in ("dot", "concat") for c in (False, True)):
        rel = report[case]
        assert set(rel) == {"query", "value", "key", "scale"} | (
            {"concat_score_weight"} if "concat" in case else set()
        ), (case, rel)
        assert max(rel.values()) < 2e-4, (case, rel)


def test_jax_backend_trains_and_matches_keras_gradients(tmp_path: Path) -> None:
    report = _run_on_backend("jax", _JAX_SCRIPT, tmp_path)
    _assert_trained_and_keras_gradients(report)
    assert report["predict_rel"] < 2e-4, report["predict_rel"]
    assert report["loaded_type"] == "luong.keras"
    assert report["loaded_equal"]
    mixed = report["mixed_loss"]
    assert mixed[-1] < 0.8 * mixed[0], mixed
    assert report["mixed_dtype"] == "bfloat16"
    assert report["mixed_equal"], "the mixed_bfloat16 layer's output is luong's bfloat16 result"


# ---------------------------------------------------------------------------------------------
# the torch backend, in a subprocess

_TORCH_SCRIPT = """
import json
import keras, numpy as np, torch
import luong.keras, luong.torch

assert keras.backend.backend() == "torch"
report = {}
rng = np.random.default_rng(0)
calls = [0]
apply = luong.torch.AttentionFunction.apply

def counted(*args):
    calls[0] += 1
    return apply(*args)

luong.torch.AttentionFunction.apply = counted

# 1. model.fit trains scale, concat_score_weight and the embedding through luong.torch
tokens = keras.Input((None,), dtype="int32")
x = keras.layers.Embedding(16, 8, mask_zero=True)(tokens)
att = luong.keras.Attention(use_scale=True, score_mode="concat", name="attention")
y = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(att([x, x])))
model = keras.Model(tokens, y)
model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
data = rng.integers(1, 16, (32, 6))
data[:, 4:] = 0
target = rng.standard_normal((32, 1)).astype("float32")
before = [np.array(w.numpy()) for w in model.weights]
history = model.fit(data, target, epochs=6, batch_size=32, verbose=0)
after = [np.array(w.numpy()) for w in model.weights]
report["loss"] = history.history["loss"]
report["changed"] = {w.path: bool(np.any(a != b)) for w, a, b in zip(model.weights, before, after)}
report["calls"] = calls[0]

# 2. gradients by torch autograd equal keras.layers.Attention's
for mode in ("dot", "concat"):
    for causal in (False, True):
        ours = luong.keras.Attention(use_scale=True, score_mode=mode)
        theirs = keras.layers.Attention(use_scale=True, score_mode=mode)
        shapes = [(3, 5, 4), (3, 7, 2), (3, 7, 4)]
        arrays = [rng.standard_normal(s).astype("float32") for s in shapes]
        masks = [torch.from_numpy(rng.random(s) < 0.7) for s in [(3, 5), (3, 7)]]
        masks[1][:, 0] = True
        do = torch.from_numpy(rng.standard_normal((3, 5, 2)).astype("float32"))
        weights = [np.float32(0.37)] + ([np.float32(1.7)] if mode == "concat" else [])
        grads = []
        for layer in (ours, theirs):
            layer.build([a.shape for a in arrays])
            layer.set_weights(weights)
            q, v, k = (torch.from_numpy(a).requires_grad_() for a in arrays)
            out = layer([q, v, k], mask=masks, use_causal_mask=causal)
            variables = [w.value for w in layer.trainable_variables]
            g = torch.autograd.grad((do * out).sum(), [q, v, k] + variables)
            grads.append({"query": g[0], "value": g[1], "key": g[2],
                          **{w.name: x for w, x in zip(layer.trainable_variables, g[3:])}})
        report[f"grad_rel_{mode}_{causal}"] = {
            name: float((grads[0][name] - want).abs().max() / want.abs().max())
            for name, want in grads[1].items()
        }
print("REPORT" + json.dumps(report))
"""


def test_torch_backend_trains_through_luong_torch_and_matches_keras_gradients(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")  # the torch extra; CI installs it
    report = _run_on_backend("torch", _TORCH_SCRIPT, tmp_path)
    _assert_trained_and_keras_gradients(report)
    assert report["calls"] >= 6, "model.fit computed the layer through luong.torch"
