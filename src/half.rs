//! Half precision storage: float16 and bfloat16 inputs and outputs, computed in float32.
//!
//! Shapes and rules are those of [`Attention::forward_nd`]. The inputs are widened to f32 once per
//! call (`O(B·T·D)` work, against the `O(B·Tq·Tv·D)` of attention itself, into buffers each thread
//! keeps for its next call), the f32 kernels run with Keras's mask bias for the storage type
//! (`65504` for float16, float16's largest finite number; `1e9` for bfloat16, as Keras), and the
//! results are rounded back to the storage type. Accumulation and softmax are in f32, so the
//! results are at least as accurate as Keras's, which computes in half precision throughout; one
//! difference shows: in a fully masked float16 row Keras's `s - 65504` overflows to `-inf` and its
//! weights are NaN, while luong's (f32) are finite — the same weights as every other fully masked
//! row.

use ::half::{bf16, f16, slice::HalfFloatSliceExt};
use ndarray::{ArrayD, ArrayViewD};

use crate::attention::{MasksNd, OutputNd};
use crate::backward::GradientsNd;
use crate::config::Attention;
use crate::error::Result;

/// A half-precision storage type: `half::f16` or `half::bf16`.
pub trait Half: Copy + Default + Send + Sync + 'static {
    /// The dtype name NumPy (and `ml_dtypes`) uses.
    const NAME: &'static str;
    /// What Keras subtracts from masked scores when it computes in this type.
    const MASK_BIAS: f64;
    /// `dst[i] = src[i]` widened to f32 (exact).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst[i] = src[i]` rounded to nearest even.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Half for f16 {
    const NAME: &'static str = "float16";
    const MASK_BIAS: f64 = 65504.0;
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst) // F16C where the CPU has it
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src)
    }
}

impl Half for bf16 {
    const NAME: &'static str = "bfloat16";
    const MASK_BIAS: f64 = 1.0e9;
    fn widen(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src)
    }
}

/// Elements per parallel conversion task.
const CHUNK: usize = 1 << 16;

/// `f(src chunk, dst chunk)` over both slices, on luong's pool when there is more than one
/// chunk (a pool that cannot start runs it here; the kernel call reports that error).
fn convert<A: Sync, B: Send>(src: &[A], dst: &mut [B], f: impl Fn(&[A], &mut [B]) + Sync) {
    match crate::pool::pool() {
        Ok(pool) if src.len() > CHUNK => {
            let chunks: Vec<_> = src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)).collect();
            crate::pool::run_jobs(Some(&pool), chunks, || (), |_, (s, d)| f(s, d));
        }
        _ => f(src, dst),
    }
}

/// `a` widened to f32 (standard layout) in a buffer this thread kept from its previous call
/// ([`Widened`]): a fresh one would be fresh pages, and a page fault per 4 KiB cost more than the
/// widening itself.
fn widen<H: Half>(a: &ArrayViewD<'_, H>) -> Widened {
    let src = a.as_standard_layout();
    let src = src.as_slice().expect("standard layout");
    let mut buf = WIDENED.with_borrow_mut(|kept| take_fitting(kept, src.len()));
    buf.clear();
    buf.resize(src.len(), 0.0); // within the kept capacity: no new pages
    convert(src, &mut buf, H::widen);
    Widened {
        buf,
        dim: a.raw_dim(),
    }
}

/// A widened input; its buffer goes back to this thread's [`WIDENED`] when dropped.
struct Widened {
    buf: Vec<f32>,
    dim: ndarray::IxDyn,
}

impl Widened {
    fn view(&self) -> ArrayViewD<'_, f32> {
        ArrayViewD::from_shape(self.dim.clone(), &self.buf).expect("same shape")
    }
}

impl Drop for Widened {
    /// Keeps the buffer for this thread's next call: at most four (query, value, key and the
    /// upstream gradient), of up to 64 MiB each.
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() <= (64 << 20) / 4 {
            WIDENED.with_borrow_mut(|kept| {
                if kept.len() < 4 {
                    kept.push(buf);
                }
            });
        }
    }
}

/// The smallest kept buffer that holds `len` floats without growing, else the largest (or a new
/// one): inputs of different sizes each find their own buffer again.
fn take_fitting(kept: &mut Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let fits = (0..kept.len())
        .filter(|&i| kept[i].capacity() >= len)
        .min_by_key(|&i| kept[i].capacity());
    let pick = fits.or_else(|| (0..kept.len()).max_by_key(|&i| kept[i].capacity()));
    pick.map(|i| kept.swap_remove(i)).unwrap_or_default()
}

thread_local! {
    /// The widening buffers of this thread's previous call.
    static WIDENED: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A fresh f32 array rounded to `H`.
fn narrow<H: Half>(a: ArrayD<f32>) -> ArrayD<H> {
    let src = a.as_slice().expect("fresh arrays are standard");
    let mut out = vec![H::default(); src.len()];
    convert(src, &mut out, H::narrow);
    ArrayD::from_shape_vec(a.raw_dim(), out).expect("same shape")
}

impl Attention {
    /// [`forward_nd`](Attention::forward_nd) on half-precision inputs (`half::f16` or
    /// `half::bf16`), computed in f32 with the storage type's mask bias (see the module docs);
    /// output and weights in the storage type.
    ///
    /// # Errors
    /// As `forward_nd`.
    pub fn forward_nd_half<H: Half>(
        &self,
        query: ArrayViewD<'_, H>,
        value: ArrayViewD<'_, H>,
        key: Option<ArrayViewD<'_, H>>,
        masks: &MasksNd<'_>,
    ) -> Result<OutputNd<H>> {
        let (q, v, k) = (widen(&query), widen(&value), key.as_ref().map(widen));
        let attn = self
            .clone()
            .mask_bias(self.mask_bias.unwrap_or(H::MASK_BIAS));
        let out = attn.forward_nd(q.view(), v.view(), k.as_ref().map(|k| k.view()), masks)?;
        Ok(OutputNd {
            output: narrow(out.output),
            scores: out.scores.map(narrow),
        })
    }

    /// [`backward_nd`](Attention::backward_nd) on half-precision inputs and upstream gradient,
    /// computed in f32 (the forward runs again inside); gradients in the storage type, the
    /// scalar ones rounded to it too.
    ///
    /// # Errors
    /// As `backward_nd`.
    pub fn backward_nd_half<H: Half>(
        &self,
        query: ArrayViewD<'_, H>,
        value: ArrayViewD<'_, H>,
        key: Option<ArrayViewD<'_, H>>,
        masks: &MasksNd<'_>,
        d_output: ArrayViewD<'_, H>,
    ) -> Result<GradientsNd<H>> {
        let (q, v, k) = (widen(&query), widen(&value), key.as_ref().map(widen));
        let d = widen(&d_output);
        let attn = self
            .clone()
            .mask_bias(self.mask_bias.unwrap_or(H::MASK_BIAS));
        let g = attn.backward_nd(
            q.view(),
            v.view(),
            k.as_ref().map(|k| k.view()),
            masks,
            d.view(),
        )?;
        let scalar = |x: Option<f32>| {
            x.map(|x| {
                let mut out = [H::default()];
                H::narrow(&[x], &mut out);
                out[0]
            })
        };
        Ok(GradientsNd {
            query: narrow(g.query),
            key: g.key.map(narrow),
            value: narrow(g.value),
            scale: scalar(g.scale),
            concat_score_weight: scalar(g.concat_score_weight),
        })
    }
}
