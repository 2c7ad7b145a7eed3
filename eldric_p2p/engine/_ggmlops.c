/* Python API of the small layer operations with ggml's x86 CPU arithmetic (csrc/ggml_ops.h has the routines and
 * says how each reproduces ggml). The fused layer of _qkernels runs the same routines without the Python calls.
 *
 * Python API (all buffers C-contiguous; float16 buffers are raw IEEE half bits):
 *   rope(x, pos, n_heads, head_dim, n_dims, base, freq_scale, neox)      x float32 [T, n_heads, head_dim], in place
 *   attention(q, k, v, out, n_heads, n_kv_heads, head_dim, pos0, ctx, scale, window, one_acc)
 *       q float32 [T, n_heads, head_dim]; k, v float16 [n_kv_heads, ctx, head_dim] (positions 0..pos0+T-1 set);
 *       out float32 [T, n_heads * head_dim]; window 0 = global, else keys with qpos - kpos >= window are hidden;
 *       one_acc selects the one-accumulator summation order (llama.cpp's batched path).
 *   swiglu(g, u, out)                                                      float32 [n] each
 *   geglu(g, u, out)                                                       float32 [n] each
 *   rms_norm(x, w, out, eps)                  x, out float32 [rows, n]; w float32 [n]
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "csrc/ggml_attn.h"
#include "csrc/ggml_ops.h"

/* ---- Python bindings --------------------------------------------------------------------------------------- */

static int get_buffer(PyObject *o, Py_buffer *b, int writable, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len != need) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, expected %zd", what, b->len, need);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    PyObject *ox, *opos;
    int nh, hd, n_dims, neox;
    float base, freq_scale;
    if (!PyArg_ParseTuple(args, "OOiiiffp", &ox, &opos, &nh, &hd, &n_dims, &base, &freq_scale, &neox)) return NULL;
    if (nh <= 0 || hd <= 0 || n_dims <= 0 || n_dims > hd || n_dims % 2) {
        PyErr_SetString(PyExc_ValueError, "rope: bad head or rotary dimensions");
        return NULL;
    }
    Py_buffer bpos, bx;
    if (PyObject_GetBuffer(opos, &bpos, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    const int64_t T = bpos.len / 8;
    if (get_buffer(ox, &bx, 1, (Py_ssize_t)(T * nh * hd * 4), "rope: x") < 0) {
        PyBuffer_Release(&bpos);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ops_rope(bx.buf, bpos.buf, T, nh, hd, n_dims, base, freq_scale, neox);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bpos);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    PyObject *oq, *ok, *ov, *oout;
    int nh, nkv, hd, one_acc;
    long long pos0, ctx, window;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOOiiiLLfLp", &oq, &ok, &ov, &oout, &nh, &nkv, &hd, &pos0, &ctx, &scale,
                          &window, &one_acc))
        return NULL;
    if (nh <= 0 || nkv <= 0 || nh % nkv || hd <= 0 || hd % 32 || pos0 < 0 || ctx <= 0) {
        PyErr_SetString(PyExc_ValueError,
                        "attention: bad head counts, head size (a multiple of 32), position or context");
        return NULL;
    }
    Py_buffer bq, bk, bv, bo;
    if (PyObject_GetBuffer(oq, &bq, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    const int64_t T = bq.len / ((Py_ssize_t)nh * hd * 4);
    if (T <= 0 || bq.len != (Py_ssize_t)(T * nh * hd * 4) || pos0 + T > ctx) {
        PyErr_SetString(PyExc_ValueError, "attention: q does not fit the context");
        PyBuffer_Release(&bq);
        return NULL;
    }
    const Py_ssize_t kv_bytes = (Py_ssize_t)nkv * ctx * hd * 2;
    if (get_buffer(ok, &bk, 0, kv_bytes, "attention: k") < 0) goto fail_q;
    if (get_buffer(ov, &bv, 0, kv_bytes, "attention: v") < 0) goto fail_k;
    if (get_buffer(oout, &bo, 1, (Py_ssize_t)(T * nh * hd * 4), "attention: out") < 0) goto fail_v;
    const attn_args a = {bq.buf, bk.buf, bv.buf, bo.buf, T, pos0, ctx, window, nh, nkv, hd, one_acc, scale};
    float *work = malloc(sizeof(float) * ops_attn_work_floats(&a));
    if (!work) {
        PyErr_NoMemory();
        goto fail_o;
    }
    Py_BEGIN_ALLOW_THREADS
    ops_attention(&a, 0, ops_attn_units(&a), work);
    Py_END_ALLOW_THREADS
    free(work);
    PyBuffer_Release(&bo);
    PyBuffer_Release(&bv);
    PyBuffer_Release(&bk);
    PyBuffer_Release(&bq);
    Py_RETURN_NONE;
fail_o:
    PyBuffer_Release(&bo);
fail_v:
    PyBuffer_Release(&bv);
fail_k:
    PyBuffer_Release(&bk);
fail_q:
    PyBuffer_Release(&bq);
    return NULL;
}

typedef void (*gated_fn)(const float *g, const float *u, float *y, int64_t n);

/* name(g, u, out): out = act(g) * u over equal-sized float32 buffers. */
static PyObject *gated_call(PyObject *args, const char *name, gated_fn fn) {
    PyObject *og, *ou, *oy;
    if (!PyArg_ParseTuple(args, "OOO", &og, &ou, &oy)) return NULL;
    Py_buffer bg, bu, by;
    if (PyObject_GetBuffer(og, &bg, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (get_buffer(ou, &bu, 0, bg.len, name) < 0) {
        PyBuffer_Release(&bg);
        return NULL;
    }
    if (get_buffer(oy, &by, 1, bg.len, name) < 0) {
        PyBuffer_Release(&bu);
        PyBuffer_Release(&bg);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fn(bg.buf, bu.buf, by.buf, bg.len / 4);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&by);
    PyBuffer_Release(&bu);
    PyBuffer_Release(&bg);
    Py_RETURN_NONE;
}

static PyObject *py_swiglu(PyObject *self, PyObject *args) { return gated_call(args, "swiglu: u/out", ops_swiglu); }

static PyObject *py_geglu(PyObject *self, PyObject *args) { return gated_call(args, "geglu: u/out", ops_geglu); }

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    PyObject *ox, *ow, *oy;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOf", &ox, &ow, &oy, &eps)) return NULL;
    Py_buffer bx, bw, by;
    if (PyObject_GetBuffer(ow, &bw, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    const int64_t n = bw.len / 4;
    if (n <= 0 || PyObject_GetBuffer(ox, &bx, PyBUF_C_CONTIGUOUS) < 0) {
        if (n <= 0) PyErr_SetString(PyExc_ValueError, "rms_norm: empty weight");
        PyBuffer_Release(&bw);
        return NULL;
    }
    if (bx.len % (n * 4) || get_buffer(oy, &by, 1, bx.len, "rms_norm: out") < 0) {
        if (bx.len % (n * 4)) PyErr_SetString(PyExc_ValueError, "rms_norm: x is not [rows, len(w)]");
        PyBuffer_Release(&bx);
        PyBuffer_Release(&bw);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ops_rms_norm(bx.buf, bw.buf, by.buf, bx.len / (n * 4), n, eps);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&by);
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bw);
    Py_RETURN_NONE;
}

/* set_simd(enabled) -> bool: use the FMA/AVX2 versions where the CPU has them (default), or the portable ones
 * (for tests: both must give the same bits). Returns whether the vector versions are now in use. */
/* set_simd(level) -> str: True (default: the widest vector code this CPU has), False ("portable"), "avx2" or
 * "avx512" (or the widest below it this CPU has); returns the name of the level now in use. */
static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    static const char *const names[] = {"portable", "avx2", "avx512"};
    int level = -1;
    if (PyUnicode_Check(arg)) {
        for (int i = 0; i < 3; i++) {
            if (PyUnicode_CompareWithASCIIString(arg, names[i]) == 0) level = i;
        }
        if (level < 0) {
            PyErr_SetString(PyExc_ValueError, "set_simd: True, False, 'portable', 'avx2' or 'avx512'");
            return NULL;
        }
    } else {
        const int on = PyObject_IsTrue(arg);
        if (on < 0) return NULL;
        level = on ? 2 : 0;
    }
    return PyUnicode_FromString(names[ops_set_simd(level)]);
}

static PyMethodDef methods[] = {
    {"set_simd", py_set_simd, METH_O,
     "set_simd(level) -> str: the vector code up to True (the widest), 'avx512', 'avx2', or False (portable C)."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMS norm times a weight, ggml's arithmetic."},
    {"geglu", py_geglu, METH_VARARGS, "gelu(g) * u through ggml's f16 GELU table."},
    {"rope", py_rope, METH_VARARGS, "Rotary embedding in place, ggml's arithmetic."},
    {"attention", py_attention, METH_VARARGS, "Causal attention over an f16 KV cache, ggml's arithmetic."},
    {"swiglu", py_swiglu, METH_VARARGS, "silu(g) * u, ggml's arithmetic."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ggmlops", "Layer operations with ggml's CPU arithmetic.", -1, methods,
};

PyMODINIT_FUNC PyInit__ggmlops(void) {
    ops_init();
    return PyModule_Create(&module);
}
