//! The thin PyO3 boundary (feature `python`): NumPy arrays in, NumPy arrays out, errors mapped.
//!
//! Inputs are borrowed (`PyReadonlyArray`, any strides, no copy); results are allocated in Rust
//! and handed to NumPy with `into_pyarray` (no copy); the GIL is released while the kernel runs.
//! The Python package (`python/luong/`) casts inputs to the compute dtype and checks Keras's
//! list rules; everything about shapes is checked in Rust (`shape.rs`) and comes back here as
//! `ValueError` (or `MemoryError` for results too large to allocate).

use numpy::{IntoPyArray, PyArrayDescrMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::ffi::c_int;

use half::{bf16, f16};

use ndarray::ArrayViewD;

use crate::{
    Attention, AttentionError, Dropout, Float, GradientsNd, Half, MasksNd, OutputNd, SavedView,
    ScoreMode,
};

fn to_py(e: AttentionError) -> PyErr {
    match e {
        AttentionError::TooLarge { .. } => PyMemoryError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// The call's settings, passed from Python as one dict.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Options {
    score_mode: String,
    scale: Option<f64>,
    concat_score_weight: f64,
    dropout: f64,
    seed: u64,
    call: u64,
    causal: bool,
    return_scores: bool,
}

impl Options {
    fn attention(&self) -> PyResult<Attention> {
        let mut attn = Attention::new(ScoreMode::parse(&self.score_mode).map_err(to_py)?)
            .concat_score_weight(self.concat_score_weight)
            .return_scores(self.return_scores)
            .dropout(Dropout {
                rate: self.dropout,
                seed: self.seed,
                call: self.call,
            });
        if let Some(s) = self.scale {
            attn = attn.scale(s);
        }
        attn.validate().map_err(to_py)?;
        Ok(attn)
    }
}

type Arrays<'py> = (Bound<'py, PyAny>, Option<Bound<'py, PyAny>>);
type Inputs<'a, 'py> = (
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
    Option<&'a Bound<'py, PyAny>>,
);
type MaskArrays<'py> = (
    Option<PyReadonlyArrayDyn<'py, bool>>,
    Option<PyReadonlyArrayDyn<'py, bool>>,
);
/// (d query, d key, d value, d scale, d concat weight)
type Grads<'py> = (
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Bound<'py, PyAny>,
    Option<f64>,
    Option<f64>,
);

/// An element type arrays are borrowed as, with its NumPy name for error messages.
trait Named: numpy::Element + Send + Sync {
    const DTYPE: &'static str;
    /// The value as a Python float.
    fn wide(self) -> f64;
}
impl Named for f32 {
    const DTYPE: &'static str = "float32";
    fn wide(self) -> f64 {
        f64::from(self)
    }
}
impl Named for f64 {
    const DTYPE: &'static str = "float64";
    fn wide(self) -> f64 {
        self
    }
}
impl Named for f16 {
    const DTYPE: &'static str = <f16 as Half>::NAME;
    fn wide(self) -> f64 {
        f64::from(self.to_f32())
    }
}
impl Named for bf16 {
    const DTYPE: &'static str = <bf16 as Half>::NAME;
    fn wide(self) -> f64 {
        f64::from(self.to_f32())
    }
}

/// Borrows `a` as an array of `T`, or a TypeError naming the argument.
fn read<'py, T: Named>(arg: &str, a: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    a.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "`{arg}` must be a {} NumPy array like `query`, got {}",
            T::DTYPE,
            describe(a)
        ))
    })
}

/// The compute path for `query`'s dtype.
#[derive(Clone, Copy)]
enum Kind {
    F32,
    F64,
    F16,
    Bf16,
}

/// Picks the path by `query`'s dtype number, and for a user-defined dtype by its name (so
/// bfloat16 is only looked up when it is there: rust-numpy finds it through `ml_dtypes`);
/// anything else goes to f32, which names the dtype in its TypeError. The number, not the name,
/// for the built-in types: `str(dtype)` runs Python code, a noticeable share of a small call
/// (measured: docs/performance.md, "Where the thresholds come from").
fn kind(query: &Bound<'_, PyAny>) -> Kind {
    use numpy::npyffi::NPY_TYPES;
    let Ok(a) = query.cast::<numpy::PyUntypedArray>() else {
        return Kind::F32;
    };
    let dtype = a.dtype();
    match dtype.num() {
        n if n == NPY_TYPES::NPY_DOUBLE as c_int => Kind::F64,
        n if n == NPY_TYPES::NPY_HALF as c_int => Kind::F16,
        n if n >= NPY_TYPES::NPY_USERDEF as c_int && dtype.to_string() == "bfloat16" => Kind::Bf16,
        _ => Kind::F32,
    }
}

/// The call's inputs borrowed as arrays of `T` (TypeError naming the argument otherwise).
struct Borrowed<'py, T: Named> {
    query: PyReadonlyArrayDyn<'py, T>,
    value: PyReadonlyArrayDyn<'py, T>,
    key: Option<PyReadonlyArrayDyn<'py, T>>,
    masks: MaskArrays<'py>,
}

impl<'py, T: Named> Borrowed<'py, T> {
    fn new((query, value, key): Inputs<'_, 'py>, masks: MaskArrays<'py>) -> PyResult<Self> {
        Ok(Borrowed {
            query: read::<T>("query", query)?,
            value: read::<T>("value", value)?,
            key: key.map(|k| read::<T>("key", k)).transpose()?,
            masks,
        })
    }

    fn masks(&self, causal: bool) -> MasksNd<'_> {
        MasksNd {
            query: self.masks.0.as_ref().map(|m| m.as_array()),
            value: self.masks.1.as_ref().map(|m| m.as_array()),
            causal,
        }
    }
}

/// The call's views and masks, as the Rust API takes them.
type Views<'v, E> = (
    ArrayViewD<'v, E>,
    ArrayViewD<'v, E>,
    Option<ArrayViewD<'v, E>>,
    &'v MasksNd<'v>,
);

/// Borrows the inputs as arrays of `E` (TypeError naming the argument otherwise) and runs `f` on
/// their views with the GIL released: every entry point goes through here.
fn with_views<'py, E: Named, R: Send>(
    py: Python<'py>,
    inputs: Inputs<'_, 'py>,
    masks: MaskArrays<'py>,
    causal: bool,
    f: impl for<'v> FnOnce(Views<'v, E>) -> crate::Result<R> + Send,
) -> PyResult<R> {
    let a = Borrowed::<E>::new(inputs, masks)?;
    let masks = a.masks(causal);
    let views = (
        a.query.as_array(),
        a.value.as_array(),
        a.key.as_ref().map(|k| k.as_array()),
        &masks,
    );
    py.detach(|| f(views)).map_err(to_py)
}

/// A forward's results handed to NumPy without copies.
fn arrays<E: Named>(py: Python<'_>, out: OutputNd<E>) -> Arrays<'_> {
    (
        out.output.into_pyarray(py).into_any(),
        out.scores.map(|s| s.into_pyarray(py).into_any()),
    )
}

/// A backward's results handed to NumPy without copies (the scalars as Python floats).
fn grads<E: Named>(py: Python<'_>, g: GradientsNd<E>) -> Grads<'_> {
    (
        g.query.into_pyarray(py).into_any(),
        g.key.map(|k| k.into_pyarray(py).into_any()),
        g.value.into_pyarray(py).into_any(),
        g.scale.map(E::wide),
        g.concat_score_weight.map(E::wide),
    )
}

/// Runs the forward in the compute type `T`.
fn run<'py, T: Float + Named>(
    py: Python<'py>,
    attn: &Attention,
    inputs: Inputs<'_, 'py>,
    masks: MaskArrays<'py>,
    causal: bool,
) -> PyResult<Arrays<'py>> {
    let out = with_views::<T, _>(py, inputs, masks, causal, |(q, v, k, m)| {
        attn.forward_nd(q, v, k, m)
    })?;
    Ok(arrays(py, out))
}

/// Runs the forward on half-precision arrays of `H` (computed in f32).
fn run_half<'py, H: Half + Named>(
    py: Python<'py>,
    attn: &Attention,
    inputs: Inputs<'_, 'py>,
    masks: MaskArrays<'py>,
    causal: bool,
) -> PyResult<Arrays<'py>> {
    let out = with_views::<H, _>(py, inputs, masks, causal, |(q, v, k, m)| {
        attn.forward_nd_half(q, v, k, m)
    })?;
    Ok(arrays(py, out))
}

/// Runs the forward in the compute type `T` and keeps what the backward needs:
/// (output, row statistics).
fn run_saved<'py, T: Float + Named>(
    py: Python<'py>,
    attn: &Attention,
    inputs: Inputs<'_, 'py>,
    masks: MaskArrays<'py>,
    causal: bool,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let saved = with_views::<T, _>(py, inputs, masks, causal, |(q, v, k, m)| {
        attn.forward_nd_saved(q, v, k, m)
    })?;
    Ok((
        saved.output.into_pyarray(py).into_any(),
        saved.stats.into_pyarray(py).into_any(),
    ))
}

/// Runs the backward in the compute type `T`; with `saved` (the output and row statistics of
/// `forward_saved`) it skips the forward.
fn run_backward<'py, T: Float + Named>(
    py: Python<'py>,
    attn: &Attention,
    (inputs, masks, causal): (Inputs<'_, 'py>, MaskArrays<'py>, bool),
    d_output: &Bound<'py, PyAny>,
    saved: Option<(&Bound<'py, PyAny>, &Bound<'py, PyAny>)>,
) -> PyResult<Grads<'py>> {
    let dout = read::<T>("d_output", d_output)?;
    let saved = match saved {
        None => None,
        Some((o, st)) => Some((read::<T>("saved output", o)?, read::<T>("saved stats", st)?)),
    };
    let saved = saved.as_ref().map(|(o, st)| SavedView {
        output: o.as_array(),
        stats: st.as_array(),
    });
    let d = dout.as_array();
    let g = with_views::<T, _>(py, inputs, masks, causal, |(q, v, k, m)| match saved {
        None => attn.backward_nd(q, v, k, m, d),
        Some(saved) => attn.backward_nd_saved(q, v, k, m, saved, d),
    })?;
    Ok(grads(py, g))
}

/// Runs the backward on half-precision arrays of `H` (computed in f32; the forward reruns).
fn run_backward_half<'py, H: Half + Named>(
    py: Python<'py>,
    attn: &Attention,
    (inputs, masks, causal): (Inputs<'_, 'py>, MaskArrays<'py>, bool),
    d_output: &Bound<'py, PyAny>,
) -> PyResult<Grads<'py>> {
    let dout = read::<H>("d_output", d_output)?;
    let d = dout.as_array();
    let g = with_views::<H, _>(py, inputs, masks, causal, |(q, v, k, m)| {
        attn.backward_nd_half(q, v, k, m, d)
    })?;
    Ok(grads(py, g))
}

fn describe(a: &Bound<'_, PyAny>) -> String {
    match a.cast::<numpy::PyUntypedArray>() {
        Ok(arr) => format!(
            "an array of dtype {} and shape {:?}",
            arr.dtype(),
            arr.shape()
        ),
        Err(_) => format!(
            "an object of type {}",
            a.get_type().name().map_or("?".into(), |n| n.to_string())
        ),
    }
}

/// attention(query, value, key, query_mask, value_mask, options) -> (output, scores | None)
///
/// query/value/key: float32, float64, float16 or bfloat16 arrays, all of one dtype; masks: bool
/// arrays or None.
#[pyfunction]
#[pyo3(signature = (query, value, key, query_mask, value_mask, options))]
fn attention<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    key: Option<&Bound<'py, PyAny>>,
    query_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    value_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    options: Options,
) -> PyResult<Arrays<'py>> {
    let attn = options.attention()?;
    let inputs = (query, value, key);
    let masks = (query_mask, value_mask);
    let causal = options.causal;
    match kind(query) {
        Kind::F64 => run::<f64>(py, &attn, inputs, masks, causal),
        Kind::F32 => run::<f32>(py, &attn, inputs, masks, causal),
        Kind::F16 => run_half::<f16>(py, &attn, inputs, masks, causal),
        Kind::Bf16 => run_half::<bf16>(py, &attn, inputs, masks, causal),
    }
}

/// forward_saved(query, value, key, query_mask, value_mask, options) -> (output, stats)
///
/// `attention` without returned weights, plus each row's softmax statistics `(..., Tq, 2)` for
/// `backward(..., saved=(output, stats))`.
#[pyfunction]
#[pyo3(signature = (query, value, key, query_mask, value_mask, options))]
fn forward_saved<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    key: Option<&Bound<'py, PyAny>>,
    query_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    value_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    options: Options,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let attn = options.attention()?;
    let inputs = (query, value, key);
    let masks = (query_mask, value_mask);
    match kind(query) {
        Kind::F64 => run_saved::<f64>(py, &attn, inputs, masks, options.causal),
        Kind::F32 => run_saved::<f32>(py, &attn, inputs, masks, options.causal),
        Kind::F16 | Kind::Bf16 => Err(PyTypeError::new_err(
            "forward_saved computes in float32 or float64; half-precision inputs use \
             attention() and backward() (which reruns the forward)",
        )),
    }
}

/// backward(query, value, key, query_mask, value_mask, d_output, options, saved=None)
///     -> (d_query, d_key | None, d_value, d_scale | None, d_concat_score_weight | None)
///
/// The gradients of `attention` with the same arguments for the upstream gradient `d_output`;
/// `saved` is `forward_saved`'s `(output, stats)` for the same call (else the forward reruns).
#[pyfunction]
#[pyo3(signature = (query, value, key, query_mask, value_mask, d_output, options, saved=None))]
#[allow(clippy::too_many_arguments)] // the Python signature: arrays in, one options dict
fn backward<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    key: Option<&Bound<'py, PyAny>>,
    query_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    value_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    d_output: &Bound<'py, PyAny>,
    options: Options,
    saved: Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>,
) -> PyResult<Grads<'py>> {
    let attn = options.attention()?;
    let inputs = (query, value, key);
    let masks = (query_mask, value_mask);
    let saved = saved.as_ref().map(|(o, s)| (o, s));
    let call = (inputs, masks, options.causal);
    match kind(query) {
        Kind::F64 => run_backward::<f64>(py, &attn, call, d_output, saved),
        Kind::F32 => run_backward::<f32>(py, &attn, call, d_output, saved),
        Kind::F16 => run_backward_half::<f16>(py, &attn, call, d_output),
        Kind::Bf16 => run_backward_half::<bf16>(py, &attn, call, d_output),
    }
}

/// Sets the number of worker threads.
#[pyfunction]
fn set_num_threads(threads: usize) -> PyResult<()> {
    crate::set_num_threads(threads).map_err(to_py)
}

/// The number of worker threads.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::num_threads()
}

/// The instruction set the float32 kernels run on (`Isa::detect`): "amx", "avx512", "avx2",
/// "neon" or "scalar".
#[pyfunction]
fn kernel_isa() -> &'static str {
    crate::Isa::detect().name()
}

/// Where a parallel call from this thread runs its steps: "openmp" (the host's OpenMP team,
/// e.g. PyTorch's, while its workers run; luong's pool while they sleep) or "luong" (luong's own
/// pool); see `crate::parallel_backend`.
#[pyfunction]
fn parallel_backend() -> &'static str {
    crate::parallel_backend().as_str()
}

/// check_shapes(query, value, key, query_mask, value_mask) -> batch shape
///
/// luong's shape rules (`shape::plan`) on shapes alone, for callers that check before any array
/// exists (the JAX bridge while tracing): the broadcast batch shape, or the `ValueError` the
/// call itself would raise.
#[pyfunction]
#[pyo3(signature = (query, value, key, query_mask, value_mask))]
fn check_shapes(
    query: Vec<usize>,
    value: Vec<usize>,
    key: Option<Vec<usize>>,
    query_mask: Option<Vec<usize>>,
    value_mask: Option<Vec<usize>>,
) -> PyResult<Vec<usize>> {
    let plan = crate::shape::plan(crate::shape::Shapes {
        query: &query,
        value: &value,
        key: key.as_deref(),
        query_mask: query_mask.as_deref(),
        value_mask: value_mask.as_deref(),
    })
    .map_err(to_py)?;
    Ok(plan.batch_shape)
}

/// planned_isa(dims, dtype, options) -> "amx" | "avx512" | "avx2" | "neon" | "scalar"
///
/// The kernel family a call of `dims = (B, Tq, Tv, D, Dv)` (B the product of the broadcast
/// batch dims) in `dtype` ("float32", "float64", "float16" or "bfloat16") with `options` runs on
/// (`Attention::planned_isa`): below the AMX tile gate, "avx512" on an AMX machine.
#[pyfunction]
fn planned_isa(
    dims: (usize, usize, usize, usize, usize),
    dtype: &str,
    options: Options,
) -> PyResult<&'static str> {
    let attn = options.attention()?;
    let (batch, tq, tv, d, dv) = dims;
    let dims = crate::shape::Dims {
        batch,
        tq,
        tv,
        d,
        dv,
    };
    let isa = match dtype {
        "float64" => attn.planned_isa::<f64>(dims, options.causal),
        "float32" | "float16" | "bfloat16" => attn.planned_isa::<f32>(dims, options.causal),
        _ => {
            return Err(PyValueError::new_err(format!(
                "dtype must be 'float32', 'float64', 'float16' or 'bfloat16', received {dtype:?}"
            )))
        }
    };
    Ok(isa.name())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // From import on, so that a process forked before luong's first call keeps to its pool.
    crate::openmp::watch_forks();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(attention, m)?)?;
    m.add_function(wrap_pyfunction!(forward_saved, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_isa, m)?)?;
    m.add_function(wrap_pyfunction!(parallel_backend, m)?)?;
    m.add_function(wrap_pyfunction!(planned_isa, m)?)?;
    m.add_function(wrap_pyfunction!(check_shapes, m)?)?;
    Ok(())
}
