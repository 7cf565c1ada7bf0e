/* PrefixIndex.match_many's lookup, compiled, for candidate lists whose replica bits fit
 * in 64 (the shared mask dict maps a block hash to the bits of the replicas holding it).
 *
 * It runs, per candidate in order, the search `match_many` is specified by (see its
 * docstring and `PrefixIndex._match_each`): a binary search for the longest held prefix,
 * trying the previous candidate's answer strictly inside (0, n) first. Mask lookups are
 * memoised by block position, so candidates probing the same blocks share them (what the
 * Python version's grouped search achieves with sets of bits).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Memo of mask lookups by block position, valid where stamp[i] == current. */
static uint32_t *stamp = NULL;
static uint64_t *memo = NULL;
static Py_ssize_t memo_cap = 0;
static uint32_t current = 0;

static int reserve(Py_ssize_t n) {
    if (n <= memo_cap) return 0;
    Py_ssize_t cap = memo_cap ? memo_cap : 1024;
    while (cap < n) cap *= 2;
    uint32_t *s = PyMem_Calloc((size_t)cap, sizeof(uint32_t));
    uint64_t *m = PyMem_Malloc((size_t)cap * sizeof(uint64_t));
    if (s == NULL || m == NULL) {
        PyMem_Free(s);
        PyMem_Free(m);
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(stamp);
    PyMem_Free(memo);
    stamp = s;
    memo = m;
    memo_cap = cap;
    current = 0;
    return 0;
}

/* The mask of block i (0 where no replica holds it); -1 with an exception set. */
static int mask_at(PyObject *masks, PyObject **hashes, Py_ssize_t i, uint64_t *out) {
    if (stamp[i] == current) {
        *out = memo[i];
        return 0;
    }
    PyObject *v = PyDict_GetItemWithError(masks, hashes[i]);
    uint64_t m = 0;
    if (v == NULL) {
        if (PyErr_Occurred()) return -1;
    } else {
        m = PyLong_AsUnsignedLongLongMask(v); /* the low 64 bits: the candidates' */
        if (m == (uint64_t)-1 && PyErr_Occurred()) return -1;
    }
    stamp[i] = current;
    memo[i] = m;
    *out = m;
    return 0;
}

#define MASK(i, var) \
    if (mask_at(masks, hashes, (i), &(var)) < 0) goto fail;

static PyObject *match_masks(PyObject *self, PyObject *args) {
    PyObject *masks, *bits, *block_hashes;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyDict_Type, &masks, &PyList_Type, &bits, &block_hashes)) return NULL;
    PyObject *seq = PySequence_Fast(block_hashes, "block_hashes must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **hashes = PySequence_Fast_ITEMS(seq);
    Py_ssize_t count = PyList_GET_SIZE(bits);
    PyObject *out = PyList_New(count);
    if (out == NULL) goto fail_seq;
    if (n > 0) {
        if (reserve(n) < 0) goto fail;
        if (++current == 0) { /* wrapped: clear the stamps */
            memset(stamp, 0, (size_t)memo_cap * sizeof(uint32_t));
            current = 1;
        }
    }
    Py_ssize_t guess = 0; /* the previous answer strictly inside (0, n) */
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *bit_obj = PyList_GET_ITEM(bits, j);
        uint64_t b = PyLong_AsUnsignedLongLongMask(bit_obj);
        if (b == (uint64_t)-1 && PyErr_Occurred()) goto fail;
        Py_ssize_t answer = 0;
        uint64_t m;
        if (n > 0 && b != 0) {
            MASK(0, m)
            if (m & b) {
                MASK(n - 1, m)
                if (m & b) {
                    answer = n;
                } else {
                    /* Invariant: block lo - 1 held, block hi not held. */
                    Py_ssize_t lo = 1, hi = n - 1;
                    int done = 0;
                    if (guess) {
                        MASK(guess - 1, m)
                        if (m & b) {
                            MASK(guess, m)
                            if (!(m & b)) {
                                answer = guess;
                                done = 1;
                            }
                            lo = guess + 1;
                        } else {
                            hi = guess - 1;
                        }
                    }
                    if (!done) {
                        while (lo < hi) {
                            Py_ssize_t mid = (lo + hi) / 2;
                            MASK(mid, m)
                            if (m & b)
                                lo = mid + 1;
                            else
                                hi = mid;
                        }
                        answer = lo;
                    }
                    guess = answer;
                }
            }
        }
        PyObject *a = PyLong_FromSsize_t(answer);
        if (a == NULL) goto fail;
        PyList_SET_ITEM(out, j, a);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
fail_seq:
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"match_masks", match_masks, METH_VARARGS,
     "match_masks(masks, bits, block_hashes) -> each candidate's longest held prefix, in blocks"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_prefix_match", NULL, -1, methods};

PyMODINIT_FUNC PyInit__prefix_match(void) { return PyModule_Create(&module); }
