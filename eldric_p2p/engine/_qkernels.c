/* Matrix-vector and matrix-matrix products computed directly on GGUF weight blocks, bit for bit as llama.cpp
 * computes them on x86 with AVX2, and whole transformer layers around them.
 *
 * out[t, r] = dot(weight row r, activation row t): each activation row is first quantized to the weight's ggml
 * "vec_dot type" (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, F16 for F16, none for F32)
 * as llama.cpp's x86 build does it; each output is then a sum of exact integer block dot products scaled by the
 * block scales, with the float32 operations in the order of the llama.cpp code path that the weight and the
 * number of activation rows select (ggml's AVX2 vec_dot and llamafile's tinyBLAS, which agree; its tiled K-quant
 * matmul for 8+ rows; the gemv/gemm of the Q4_K weights it repacks). Q2_K, Q3_K, F16 and F32 follow ggml's
 * formulas in a simpler float order (equal to llama.cpp's up to float32 rounding).
 *
 * Every kernel has a portable C version computing the same bits (csrc/qk_portable.h); on x86-64 the hot types
 * have AVX2 versions (csrc/qk_avx2.h, with FMA and F16C) and AVX-512 versions (csrc/qk_avx512.h, with BW, VL,
 * DQ and VNNI), compiled with function target attributes so the module needs no -march flag, and chosen at run
 * time by what the CPU has. The result does not depend on the machine, the kernel set or the thread count.
 * csrc/qk_matmul.h drives a product, csrc/qk_pool.h is the thread pool, csrc/qk_layer.h the fused layer.
 *
 * Python API:
 *   qmatmul(x, w, out, ggml_type, in_features, out_features, n_threads, repacked=-1, segments=None) -> None
 *     x        buffer of float32 [T, in_features] (C-contiguous): one batch, as llama.cpp would get it
 *     w        buffer of the raw GGUF bytes [out_features, in_features / block * type_size]
 *     out      writable buffer of float32 [T, out_features]
 *     repacked -1: as llama.cpp decides (it repacks Q4_K weights with out_features % 8 == 0), 0: no, 1: yes
 *     segments row counts summing to T, each computed as llama.cpp computes a batch of that many rows
 *   Raises ValueError for sizes that do not match (or a weight llama.cpp cannot repack), TypeError for a
 *   non-float32 x/out, NotImplementedError for an unsupported type. The GIL is released during the computation.
 *   layer_plan(dict) -> capsule; layers(plans, h, segments, n_threads) -> None: see their docstrings and
 *   csrc/qk_layer.h.
 *   simd() / set_simd(level): the kernel set in use ('avx512', 'avx2', 'portable'), and choosing a narrower one.
 *   set_spin_us(us): how long idle workers spin for the next job.
 *   keep_warm(seconds, n) / warm_stats(): spinners that keep the CPUs out of idle states (csrc/qk_warm.h).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "csrc/ggml_ops.h"
#include "csrc/qk_matmul.h"
#include "csrc/qk_layer.h"
#include "csrc/qk_warm.h"

static int is_float32_format(const char *fmt) {
    if (fmt == NULL) return 1;
    if (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@') fmt++;
    return strcmp(fmt, "f") == 0;
}

/* Fill wt from Python arguments; returns -1 with a Python exception set. */
static int weight_from_args(qk_weight *wt, int type, Py_ssize_t in, Py_ssize_t nout, int repacked) {
    const char *err = NULL;
    if (qk_weight_init(wt, type, in, nout, repacked, &err) == 0) return 0;
    if (strcmp(err, "type") == 0) {
        PyErr_Format(PyExc_NotImplementedError, "ggml type %d has no quantized matmul kernel", type);
    } else if (strcmp(err, "sizes") == 0) {
        PyErr_Format(PyExc_ValueError, "in_features=%zd out_features=%zd: need positive sizes, in_features a "
                     "multiple of %d", in, nout, find_type(type)->block);
    } else {
        PyErr_Format(PyExc_ValueError, "llama.cpp does not repack a ggml type %d weight of %zd rows", type, nout);
    }
    return -1;
}

/* Segment sizes from None (one segment of T rows) or a tuple of row counts summing to T; returns a
 * PyMem_RawMalloc'ed array (n_seg entries) or NULL with an exception set. */
static int64_t *segments_from_args(PyObject *osegments, int64_t T, int64_t *n_seg) {
    *n_seg = 1;
    if (osegments != Py_None) {
        if (!PyTuple_Check(osegments) || PyTuple_GET_SIZE(osegments) < 1) {
            PyErr_SetString(PyExc_ValueError, "segments must be a non-empty tuple of row counts");
            return NULL;
        }
        *n_seg = PyTuple_GET_SIZE(osegments);
    }
    int64_t *sizes = PyMem_RawMalloc(sizeof(int64_t) * (size_t)*n_seg);
    if (sizes == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    int64_t t0 = 0;
    for (int64_t k = 0; k < *n_seg; k++) {
        int64_t n = T;
        if (osegments != Py_None) {
            n = PyLong_AsSsize_t(PyTuple_GET_ITEM(osegments, k));
            if (n == -1 && PyErr_Occurred()) goto fail;
        }
        if (n < 1 || n > T - t0) {
            PyErr_Format(PyExc_ValueError, "segments must be positive row counts summing to %zd", (Py_ssize_t)T);
            goto fail;
        }
        sizes[k] = n;
        t0 += n;
    }
    if (t0 != T) {
        PyErr_Format(PyExc_ValueError, "segments sum to %zd rows, x has %zd", (Py_ssize_t)t0, (Py_ssize_t)T);
        goto fail;
    }
    return sizes;
fail:
    PyMem_RawFree(sizes);
    return NULL;
}

static PyObject *py_qmatmul(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ox, *ow, *oout;
    PyObject *osegments = Py_None;
    int type, n_threads, repacked = -1;
    Py_ssize_t in, nout;
    if (!PyArg_ParseTuple(args, "OOOinni|iO", &ox, &ow, &oout, &type, &in, &nout, &n_threads, &repacked,
                          &osegments)) return NULL;
    qk_weight wt;
    if (weight_from_args(&wt, type, in, nout, repacked) < 0) return NULL;

    Py_buffer bx = {0}, bw = {0}, bo = {0};
    PyObject *result = NULL;
    void *xq = NULL;
    int64_t *sizes = NULL;
    range_t *ranges = NULL;
    if (PyObject_GetBuffer(ox, &bx, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    if (PyObject_GetBuffer(ow, &bw, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(oout, &bo, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) goto done;
    if (!is_float32_format(bx.format) || !is_float32_format(bo.format)) {
        PyErr_SetString(PyExc_TypeError, "x and out must be float32 buffers");
        goto done;
    }
    const Py_ssize_t row_in = in * 4;
    if (bx.len % row_in != 0) {
        PyErr_Format(PyExc_ValueError, "x has %zd bytes, not a whole number of float32 rows of %zd", bx.len, in);
        goto done;
    }
    const Py_ssize_t T = bx.len / row_in;
    const Py_ssize_t wrow = (Py_ssize_t)wt.wrow;
    if (nout > PY_SSIZE_T_MAX / wrow || bw.len != nout * wrow) {
        PyErr_Format(PyExc_ValueError, "w has %zd bytes, expected %zd rows of %zd bytes", bw.len, nout, wrow);
        goto done;
    }
    if (T > 0 && (nout > PY_SSIZE_T_MAX / 4 / T || bo.len != T * nout * 4)) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, expected [%zd, %zd] float32", bo.len, T, nout);
        goto done;
    }
    if (T == 0) {
        if (bo.len != 0) {
            PyErr_SetString(PyExc_ValueError, "out must be empty when x is");
            goto done;
        }
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    int64_t n_seg;
    sizes = segments_from_args(osegments, T, &n_seg);
    if (sizes == NULL) goto done;
    xq = PyMem_RawMalloc(wt.xrow * (size_t)T + 64);
    ranges = PyMem_RawMalloc(sizeof(range_t) * (size_t)(2 * n_seg));
    if (xq == NULL || ranges == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const int n_ranges = qk_ranges(&wt, sizes, n_seg, ranges);
    Py_BEGIN_ALLOW_THREADS
    qk_quantize(&wt, bx.buf, T, xq, n_threads);
    qk_compute(&wt, bw.buf, ranges, n_ranges, xq, bo.buf, T, n_threads);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;

done:
    PyMem_RawFree(ranges);
    PyMem_RawFree(sizes);
    PyMem_RawFree(xq);
    if (bx.obj) PyBuffer_Release(&bx);
    if (bw.obj) PyBuffer_Release(&bw);
    if (bo.obj) PyBuffer_Release(&bo);
    return result;
}

/* ------------------------------------------------------------------------------------------------------------
 * The fused layer (csrc/qk_layer.h): layer_plan(dict) -> capsule once per layer, layers(plans, h, segs, threads)
 * per forward.
 */

#define PLAN_CAPSULE "eldric_p2p.engine._qkernels.layer"
#define PLAN_MAX_BUFS 24

/* A layer_t and the buffers it points into, held until the capsule is freed. */
typedef struct {
    layer_t L;
    Py_buffer bufs[PLAN_MAX_BUFS];
    int n_bufs;
} layer_plan;

static void plan_release(layer_plan *p) {
    for (int i = 0; i < p->n_bufs; i++) PyBuffer_Release(&p->bufs[i]);
    PyMem_RawFree(p);
}

static void plan_capsule_free(PyObject *cap) {
    layer_plan *p = PyCapsule_GetPointer(cap, PLAN_CAPSULE);
    if (p != NULL) plan_release(p);
}

/* o (named `key` in errors): a buffer of exactly `bytes` bytes (float32 when `f32`), or NULL when it is absent or
 * None and `optional`. */
static int plan_buffer_of(layer_plan *p, PyObject *o, const char *key, Py_ssize_t bytes, int f32, int optional,
                          const void **out) {
    *out = NULL;
    if (o == NULL || o == Py_None) {
        if (optional) return 0;
        PyErr_Format(PyExc_ValueError, "layer_plan: %s is missing", key);
        return -1;
    }
    Py_buffer *b = &p->bufs[p->n_bufs];
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    p->n_bufs++;
    if (b->len != bytes || (f32 && !is_float32_format(b->format))) {
        PyErr_Format(PyExc_ValueError, "layer_plan: %s has %zd bytes%s, expected %zd", key, b->len,
                     f32 ? " (float32?)" : "", bytes);
        return -1;
    }
    *out = b->buf;
    return 0;
}

static int plan_buffer(layer_plan *p, PyObject *d, const char *key, Py_ssize_t bytes, int f32, int optional,
                       const void **out) {
    return plan_buffer_of(p, PyDict_GetItemString(d, key), key, bytes, f32, optional, out);
}

static int plan_number(PyObject *d, const char *key, double *v) {
    PyObject *o = PyDict_GetItemString(d, key);
    if (o == NULL) {
        PyErr_Format(PyExc_ValueError, "layer_plan: %s is missing", key);
        return -1;
    }
    *v = PyFloat_AsDouble(o);
    return *v == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* d[key] = (raw blocks, ggml type, repacked) for a weight [out, in]; d[bias_key] its bias or None. */
static int plan_linear(layer_plan *p, PyObject *d, const char *key, const char *bias_key, int64_t in, int64_t out,
                       lin_t *l) {
    PyObject *o = PyDict_GetItemString(d, key), *ow;
    int type, repacked;
    if (o == NULL || !PyArg_ParseTuple(o, "Oii", &ow, &type, &repacked)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "layer_plan: %s is missing", key);
        return -1;
    }
    if (weight_from_args(&l->wt, type, in, out, repacked) < 0) return -1;
    if (plan_buffer_of(p, ow, key, (Py_ssize_t)(l->wt.wrow * (size_t)out), 0, 0, (const void **)&l->w) < 0) {
        return -1;
    }
    return bias_key ? plan_buffer(p, d, bias_key, out * 4, 1, 1, (const void **)&l->bias) : 0;
}

static PyObject *py_layer_plan(PyObject *self, PyObject *d) {
    (void)self;
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "layer_plan takes a dict");
        return NULL;
    }
    layer_plan *p = PyMem_RawCalloc(1, sizeof(layer_plan));
    if (p == NULL) return PyErr_NoMemory();
    layer_t *L = &p->L;
    double v[14];
    static const char *const NUM[] = {"hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "rope_dims", "neox",
                                      "gelu", "rope_base", "freq_scale", "eps", "q_scale", "score_scale", "window"};
    for (int i = 0; i < 14; i++) {
        if (plan_number(d, NUM[i], &v[i]) < 0) goto fail;
    }
    L->hidden = (int64_t)v[0], L->nh = (int64_t)v[1], L->nkv = (int64_t)v[2], L->hd = (int64_t)v[3];
    L->ffn = (int64_t)v[4], L->rope_dims = (int)v[5], L->neox = v[6] != 0.0, L->gelu = v[7] != 0.0;
    L->rope_base = (float)v[8], L->freq_scale = (float)v[9], L->eps = (float)v[10], L->q_scale = (float)v[11];
    L->score_scale = (float)v[12], L->window = (int64_t)v[13];
    if (L->hidden <= 0 || L->nh <= 0 || L->nkv <= 0 || L->nh % L->nkv || L->hd <= 0 || L->hd % 32 ||
        L->ffn <= 0 || L->rope_dims <= 0 || L->rope_dims > L->hd || L->rope_dims % 2 || L->window < 0) {
        PyErr_SetString(PyExc_ValueError, "layer_plan: bad sizes (head_dim must be a multiple of 32)");
        goto fail;
    }
    const int64_t hid = L->hidden, qd = L->nh * L->hd, kvd = L->nkv * L->hd;
    if (plan_linear(p, d, "wq", "bq", hid, qd, &L->wq) < 0 || plan_linear(p, d, "wk", "bk", hid, kvd, &L->wk) < 0 ||
        plan_linear(p, d, "wv", "bv", hid, kvd, &L->wv) < 0 || plan_linear(p, d, "wo", NULL, qd, hid, &L->wo) < 0 ||
        plan_linear(p, d, "gate", NULL, hid, L->ffn, &L->gate) < 0 ||
        plan_linear(p, d, "up", NULL, hid, L->ffn, &L->up) < 0 ||
        plan_linear(p, d, "down", NULL, L->ffn, hid, &L->down) < 0) {
        goto fail;
    }
    if (plan_buffer(p, d, "attn_norm", hid * 4, 1, 0, (const void **)&L->attn_norm) < 0 ||
        plan_buffer(p, d, "ffn_norm", hid * 4, 1, 0, (const void **)&L->ffn_norm) < 0 ||
        plan_buffer(p, d, "q_norm", L->hd * 4, 1, 1, (const void **)&L->q_norm) < 0 ||
        plan_buffer(p, d, "k_norm", L->hd * 4, 1, 1, (const void **)&L->k_norm) < 0 ||
        plan_buffer(p, d, "post_attn_norm", hid * 4, 1, 1, (const void **)&L->post_attn_norm) < 0 ||
        plan_buffer(p, d, "post_ffn_norm", hid * 4, 1, 1, (const void **)&L->post_ffn_norm) < 0) {
        goto fail;
    }
    if ((L->q_norm == NULL) != (L->k_norm == NULL)) {
        PyErr_SetString(PyExc_ValueError, "layer_plan: q_norm and k_norm come together");
        goto fail;
    }
    PyObject *cap = PyCapsule_New(p, PLAN_CAPSULE, plan_capsule_free);
    if (cap == NULL) goto fail;
    return cap;
fail:
    plan_release(p);
    return NULL;
}

static PyObject *py_layers(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oplans, *oh, *osegs;
    int n_threads;
    if (!PyArg_ParseTuple(args, "O!OO!i", &PyTuple_Type, &oplans, &oh, &PyTuple_Type, &osegs, &n_threads)) {
        return NULL;
    }
    const Py_ssize_t n_layers = PyTuple_GET_SIZE(oplans), n_seg = PyTuple_GET_SIZE(osegs);
    if (n_layers < 1 || n_seg < 1) {
        PyErr_SetString(PyExc_ValueError, "layers: no layers or no segments");
        return NULL;
    }
    const layer_t **Ls = PyMem_RawCalloc((size_t)n_layers, sizeof(layer_t *));
    seg_t *segs = PyMem_RawCalloc((size_t)n_seg, sizeof(seg_t));
    Py_buffer *kv = PyMem_RawCalloc((size_t)(2 * n_seg), sizeof(Py_buffer));
    Py_buffer bh = {0};
    PyObject *result = NULL;
    if (Ls == NULL || segs == NULL || kv == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_layers; i++) {
        const layer_plan *p = PyCapsule_GetPointer(PyTuple_GET_ITEM(oplans, i), PLAN_CAPSULE);
        if (p == NULL) goto done;
        Ls[i] = &p->L;
        const layer_t *a = Ls[0], *b = Ls[i];
        if (b->hidden != a->hidden || b->nh != a->nh || b->nkv != a->nkv || b->hd != a->hd || b->ffn != a->ffn) {
            PyErr_SetString(PyExc_ValueError, "layers: the layers differ in shape");
            goto done;
        }
    }
    const layer_t *L0 = Ls[0];
    int64_t N = 0, max_T = 1;
    for (Py_ssize_t g = 0; g < n_seg; g++) {
        PyObject *ok, *ov;
        long long ctx, pos0, T;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(osegs, g), "OOLLL", &ok, &ov, &ctx, &pos0, &T)) goto done;
        const Py_ssize_t bytes = (Py_ssize_t)(n_layers * L0->nkv * ctx * L0->hd * 2);
        if (ctx <= 0 || T < 1 || pos0 < 0 || pos0 + T > ctx) {
            PyErr_SetString(PyExc_ValueError, "layers: a segment does not fit its context");
            goto done;
        }
        for (int j = 0; j < 2; j++) {
            Py_buffer *b = &kv[2 * g + j];
            if (PyObject_GetBuffer(j ? ov : ok, b, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
            if (b->len != bytes) {
                PyErr_Format(PyExc_ValueError, "layers: a cache has %zd bytes, expected %zd", b->len, bytes);
                goto done;
            }
        }
        segs[g] = (seg_t){kv[2 * g].buf, kv[2 * g + 1].buf, ctx, pos0, T};
        N += T;
        max_T = T > max_T ? T : max_T;
    }
    if (PyObject_GetBuffer(oh, &bh, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) goto done;
    if (!is_float32_format(bh.format) || bh.len != (Py_ssize_t)(N * L0->hidden * 4)) {
        PyErr_Format(PyExc_ValueError, "layers: h must be float32 [%lld, %lld]", (long long)N,
                     (long long)L0->hidden);
        goto done;
    }
    layer_scratch sc;
    const layer_t *widest = L0; /* the scratch must hold every layer's quantized rows */
    for (Py_ssize_t i = 1; i < n_layers; i++) widest = layer_xrow(Ls[i]) > layer_xrow(widest) ? Ls[i] : widest;
    int rc = -1;
    Py_BEGIN_ALLOW_THREADS
    if (scratch_alloc(&sc, widest, N, n_seg, max_T) == 0) {
        rc = 0;
        for (Py_ssize_t i = 0; i < n_layers && rc == 0; i++) {
            rc = layer_forward(Ls[i], i, bh.buf, N, segs, n_seg, &sc, n_threads);
        }
        scratch_free(&sc);
    }
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (bh.obj) PyBuffer_Release(&bh);
    if (kv != NULL) {
        for (Py_ssize_t i = 0; i < 2 * n_seg; i++) {
            if (kv[i].obj) PyBuffer_Release(&kv[i]);
        }
    }
    PyMem_RawFree(kv);
    PyMem_RawFree(segs);
    PyMem_RawFree(Ls);
    return result;
}

static PyObject *py_supported_types(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *t = PyTuple_New(N_TYPES);
    if (t == NULL) return NULL;
    for (int i = 0; i < N_TYPES; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLong(TYPES[i].type));
    return t;
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(SIMD_NAMES[simd_level]);
}

/* set_simd(level): True (the widest this CPU has), False ("portable"), or a name; returns the name in use. */
static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    int level = -1;
    if (PyUnicode_Check(arg)) {
        for (int i = 0; i <= SIMD_AVX512; i++) {
            if (PyUnicode_CompareWithASCIIString(arg, SIMD_NAMES[i]) == 0) level = i;
        }
        if (level < 0) {
            PyErr_SetString(PyExc_ValueError, "set_simd: True, False, 'portable', 'avx2' or 'avx512'");
            return NULL;
        }
    } else {
        const int on = PyObject_IsTrue(arg);
        if (on < 0) return NULL;
        level = on ? SIMD_AVX512 : SIMD_PORTABLE;
    }
    ops_set_simd(level);
    return PyUnicode_FromString(SIMD_NAMES[qk_set_simd(level)]);
}

static PyObject *py_set_spin_us(PyObject *self, PyObject *arg) {
    (void)self;
    const long long us = PyLong_AsLongLong(arg);
    if (us == -1 && PyErr_Occurred()) return NULL;
    if (us < 0 || us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "spin time must be 0..1000000 microseconds");
        return NULL;
    }
    const int64_t old = atomic_exchange(&g_spin_ns, (int64_t)us * 1000);
    return PyLong_FromLongLong(old / 1000);
}

static PyObject *py_keep_warm(PyObject *self, PyObject *args) {
    (void)self;
    double seconds;
    int n;
    if (!PyArg_ParseTuple(args, "di", &seconds, &n)) return NULL;
    if (!(seconds >= 0 && seconds <= 3600) || n < 0 || n > MAX_SPINNERS) {
        PyErr_Format(PyExc_ValueError, "keep_warm: seconds must be 0..3600 and n 0..%d", MAX_SPINNERS);
        return NULL;
    }
    if (n > 0 && seconds > 0) warm_until(now_ns() + (int64_t)(seconds * 1e9), n);
    Py_RETURN_NONE;
}

static PyObject *py_warm_stats(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    const int64_t left = atomic_load(&g_warm_until_ns) - now_ns();
    return Py_BuildValue("{s:i,s:i,s:d,s:d}", "started", atomic_load(&g_warm_started), "idle_policy",
                         atomic_load(&g_warm_idle), "spun_s", (double)atomic_load(&g_warm_spun_ns) / 1e9,
                         "warm_for_s", left > 0 ? (double)left / 1e9 : 0.0);
}

static PyMethodDef methods[] = {
    {"keep_warm", py_keep_warm, METH_VARARGS,
     "keep_warm(seconds, n) -> None: up to n spinner threads at SCHED_IDLE keep the CPUs from idling for the\n"
     "next `seconds` (extends a running period, never shortens it); see csrc/qk_warm.h."},
    {"warm_stats", py_warm_stats, METH_NOARGS,
     "warm_stats() -> dict: spinners started, of them at SCHED_IDLE, seconds spun in all, seconds still warm."},
    {"set_spin_us", py_set_spin_us, METH_O,
     "set_spin_us(us) -> int: how long idle workers spin before sleeping (default 200); returns the old value."},
    {"qmatmul", py_qmatmul, METH_VARARGS,
     "qmatmul(x, w, out, ggml_type, in_features, out_features, n_threads, repacked=-1) -> None\n"
     "out[T, out_features] = x[T, in_features] @ W.T on GGUF blocks, with llama.cpp's x86 CPU arithmetic.\n"
     "repacked: -1 as llama.cpp decides (Q4_K with out_features % 8 == 0), 0 never, 1 always."},
    {"layer_plan", py_layer_plan, METH_O,
     "layer_plan(dict) -> capsule: one transformer layer's weights, norms and shapes for layers() (see\n"
     "engine/model.py); holds the buffers it was given."},
    {"layers", py_layers, METH_VARARGS,
     "layers(plans, h, segments, n_threads) -> None: the layers in order over h float32 [N, hidden], in place;\n"
     "segments: ((k_cache, v_cache, ctx, pos0, T), ...) of f16 [n_layers, n_kv, ctx, head_dim] caches."},
    {"supported_types", py_supported_types, METH_NOARGS, "The ggml type ids with a kernel."},
    {"simd", py_simd, METH_NOARGS, "The kernel set in use: 'avx512', 'avx2' or 'portable'."},
    {"set_simd", py_set_simd, METH_O,
     "set_simd(level) -> str: True (default: the widest kernel set this CPU has), False ('portable'), 'avx2' or\n"
     "'avx512' (or the widest below it this CPU has); returns the name of the set now in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_qkernels", "Quantized matmul kernels on GGUF blocks (ggml's CPU arithmetic).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__qkernels(void) {
    pthread_atfork(NULL, NULL, pool_after_fork_child);
    pthread_atfork(NULL, NULL, warm_after_fork_child);
    ops_init();
    qk_set_simd(SIMD_AVX512);
    return PyModule_Create(&module);
}
