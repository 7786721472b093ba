/* Both outputs of a KDPM2 substep in one pass over memory, for contiguous float32/float64 CPU tensors.
 *
 * Each output is a sum of one to three terms coef*x, evaluated exactly as kdpm2_torch's torch kernels do
 * (backend._combine), so that the two paths agree bit for bit:
 *     lead ? x[0] : x[0]*k[0]        (a leading coefficient 1 skips its multiply)
 *     then fma(k[t], x[t], acc)      for each further term, rounded once as torch's add(..., alpha=) does.
 * Torch's two kernels read the inputs once per output; here the array is cut into blocks that stay in the L1
 * cache, both outputs of a block are computed from it, and so each input is read from memory once.
 * Outputs must not overlap the inputs (the caller allocates them). A CPython module of one function taking
 * data pointers as integers (no torch headers), threads from OpenMP, the GIL released while it runs. The
 * x86-64 build is cloned per ISA level so that fma is one instruction wherever the CPU has it; without
 * hardware fma the C library computes the same correctly rounded value.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

enum { BLOCK = 1024 };  /* elements: five 4 KiB blocks (three inputs, two outputs) stay in L1 */

typedef struct {
    void *dst;
    const void *x[3];
    double k[3];
    int terms, lead;
} output_t;

#define DEFINE_BLOCK(NAME, T, FMA)                                                  \
    CLONES static void NAME(const output_t *o, ptrdiff_t start, ptrdiff_t len) {    \
        T *d = (T *)o->dst + start;                                                 \
        const T *x0 = o->terms > 0 ? (const T *)o->x[0] + start : d;                \
        const T *x1 = o->terms > 1 ? (const T *)o->x[1] + start : d;                \
        const T k0 = (T)o->k[0], k1 = (T)o->k[1];                                   \
        if (o->terms == 0) {                                                        \
            for (ptrdiff_t j = 0; j < len; j++) d[j] = 0;                           \
        } else if (o->terms == 1) {                                                 \
            for (ptrdiff_t j = 0; j < len; j++) d[j] = x0[j] * k0;                  \
        } else if (o->lead) {                                                       \
            for (ptrdiff_t j = 0; j < len; j++) d[j] = FMA(k1, x1[j], x0[j]);       \
        } else {                                                                    \
            for (ptrdiff_t j = 0; j < len; j++) d[j] = FMA(k1, x1[j], x0[j] * k0);  \
        }                                                                           \
        if (o->terms == 3) {                                                        \
            const T *x2 = (const T *)o->x[2] + start;                               \
            const T k2 = (T)o->k[2];                                                \
            for (ptrdiff_t j = 0; j < len; j++) d[j] = FMA(k2, x2[j], d[j]);        \
        }                                                                           \
    }

DEFINE_BLOCK(block_f32, float, fmaf)
DEFINE_BLOCK(block_f64, double, fma)

/* Both outputs of n elements, block by block; the blocks are split over `threads` OpenMP threads in
 * contiguous parts. Linked against libgomp.so.1 after torch has loaded its own, this is torch's thread pool. */
static void update(const output_t out[2], ptrdiff_t n, int threads, int is_double) {
    ptrdiff_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (ptrdiff_t i = 0; i < blocks; i++) {
        ptrdiff_t start = i * BLOCK, len = n - start < BLOCK ? n - start : BLOCK;
        for (int k = 0; k < 2; k++) (is_double ? block_f64 : block_f32)(&out[k], start, len);
    }
}

/* The terms of coefficients other than 0, and whether the first can skip its multiply: as backend._combine. */
static void gather(output_t *o, int count, void *const *x, const double *k) {
    o->terms = 0;
    for (int t = 0; t < count; t++) {
        if (k[t] != 0.0) {
            o->x[o->terms] = x[t];
            o->k[o->terms++] = k[t];
        }
    }
    o->lead = o->terms > 1 && o->k[0] == 1.0;
}

/* Python: update(is_double, n, threads, prev, pred, stored, sample, model_output, a, b, c, p, q) with data
 * pointers as integers (stored: None when a is 0) computes
 *     prev = a*stored + b*sample + c*model_output,  pred = p*sample + q*model_output. */
static PyObject *py_update(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 13) return PyErr_Format(PyExc_TypeError, "update() takes 13 arguments, got %zd", nargs);
    int is_double = PyObject_IsTrue(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    long threads = PyLong_AsLong(args[2]);
    void *ptr[5];
    double k[5];
    for (int i = 0; i < 5; i++) {
        ptr[i] = args[3 + i] == Py_None ? NULL : PyLong_AsVoidPtr(args[3 + i]);
        k[i] = PyFloat_AsDouble(args[8 + i]);
    }
    if (PyErr_Occurred() || is_double < 0) return NULL;
    if (n < 0 || !ptr[0] || !ptr[1] || (!ptr[2] && k[0] != 0.0) || !ptr[3] || !ptr[4])
        return PyErr_Format(PyExc_ValueError, "update(): n < 0 or a null pointer");
    output_t out[2] = {{NULL, {NULL, NULL, NULL}, {0.0, 0.0, 0.0}, 0, 0},
                       {NULL, {NULL, NULL, NULL}, {0.0, 0.0, 0.0}, 0, 0}};
    out[0].dst = ptr[0];
    gather(&out[0], 3, ptr + 2, k);
    out[1].dst = ptr[1];
    gather(&out[1], 2, ptr + 3, k + 3);
    Py_BEGIN_ALLOW_THREADS
    update(out, n, threads < 1 ? 1 : threads > 1024 ? 1024 : (int)threads, is_double);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"update", (PyCFunction)(void (*)(void))py_update, METH_FASTCALL, "Both outputs of a substep, one pass."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
