/* The cache-aware policy's per-replica scoring loop, compiled.
 *
 * The specification is `score_replicas_py` in replica_scores.py: this file does the same
 * floating-point operations in the same order (built with -ffp-contract=off, so no fused
 * multiply-add changes a rounding), so that decisions and scores are equal bit for bit
 * (tests/test_routing_policy_equivalence.py checks both against a frozen reference).
 * Python calls back only where the Python version mutates state: DecodeExposure.at().
 *
 * Sums: queued requests are summed left to right in a double, as Python 3.11's sum() of
 * floats does (3.12 compensates; the equivalence test would flag it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

static PyObject *s_num_waiting, *s_num_running, *s_in_flight, *s_kv_usage, *s_max_num_seqs,
    *s_kv_capacity_blocks, *s_backlog_until, *s_kv_owed, *s_decodes, *s_slot_rate, *s_slot_count,
    *s_live, *s_heap, *s_total, *s_at;

/* obj.name as a double (ints and bools too); -1 with an exception set on failure. */
static int get_double(PyObject *obj, PyObject *name, double *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    double d = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    *out = d;
    return 0;
}

static int item_double(PyObject *tuple, Py_ssize_t i, double *out) {
    double d = PyFloat_AsDouble(PyTuple_GET_ITEM(tuple, i));
    if (d == -1.0 && PyErr_Occurred()) return -1;
    *out = d;
    return 0;
}

/* slot_turnover_s(state, busy, slot_turnover, duration_s) */
static int slot_turnover_s(PyObject *state, double busy, int slot_turnover, double duration_s, double *out) {
    if (!slot_turnover || state == Py_None) {
        *out = duration_s;
        return 0;
    }
    double known, slot_rate;
    if (get_double(state, s_slot_count, &known) < 0) return -1;
    if (known == 0.0) {
        *out = duration_s;
        return 0;
    }
    if (get_double(state, s_slot_rate, &slot_rate) < 0) return -1;
    double share = known < busy ? known / busy : 1.0;
    *out = 1.0 / (share * slot_rate / known + (1.0 - share) / duration_s);
    return 0;
}

enum {
    P_PROMPT_TOKENS, P_BLOCK_SIZE, P_IN_FLIGHT_WEIGHT, P_BALANCE_ABS, P_BALANCE_REL, P_KV_OVERLOAD,
    P_PREFILL_RATE, P_INV_BATCH, P_MEAN_TOKENS, P_DURATION_S, P_KV_HIGH, P_KV_SCALE,
    P_EXTERNALITY_WEIGHT, P_KV_WAIT_WEIGHT, P_OUT_TOKENS, P_TPOT_WEIGHT, P_BACKLOG_WEIGHT, P_NOW,
    P_SLOT_TURNOVER, P_SLOT_EXTERNALITY, P_COUNT
};

#define STACK_REPLICAS 128

static PyObject *score_replicas(PyObject *self, PyObject *args) {
    PyObject *replicas, *ids, *matched, *aligned, *params, *affinity_floor_obj;
    Py_ssize_t affinity_candidate, offset;
    if (!PyArg_ParseTuple(args, "OOOOOnOn", &replicas, &ids, &matched, &aligned, &params,
                          &affinity_candidate, &affinity_floor_obj, &offset))
        return NULL;
    if (!PyList_Check(replicas) || !PyList_Check(ids) || !PyList_Check(matched) || !PyList_Check(aligned)) {
        PyErr_SetString(PyExc_TypeError, "replicas, ids, matched and aligned must be lists");
        return NULL;
    }
    if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != P_COUNT) {
        PyErr_SetString(PyExc_TypeError, "params must be a ScoreParams");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(replicas);
    if (n == 0 || PyList_GET_SIZE(ids) != n || PyList_GET_SIZE(matched) != n || PyList_GET_SIZE(aligned) != n) {
        PyErr_SetString(PyExc_ValueError, "replicas, ids, matched and aligned must be as long, and not empty");
        return NULL;
    }
    if (offset < 0 || offset >= n) {
        PyErr_SetString(PyExc_ValueError, "offset out of range");
        return NULL;
    }
    double p[P_COUNT];
    for (int k = 0; k < P_COUNT; k++)
        if (item_double(params, k, &p[k]) < 0) return NULL;

    double stack_buf[4 * STACK_REPLICAS];
    double *buf = stack_buf;
    if (n > STACK_REPLICAS) {
        buf = PyMem_Malloc(sizeof(double) * 4 * (size_t)n);
        if (buf == NULL) return PyErr_NoMemory();
    }
    double *queued = buf, *loads = buf + n, *running = buf + 2 * n, *kv_usage = buf + 3 * n;
    PyObject *scores = NULL, *result = NULL;

    double in_flight_weight = p[P_IN_FLIGHT_WEIGHT];
    double min_load = 0.0, queued_sum = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = PyList_GET_ITEM(replicas, i);
        double nw, nr, inf;
        if (get_double(r, s_num_waiting, &nw) < 0 || get_double(r, s_num_running, &nr) < 0 ||
            get_double(r, s_in_flight, &inf) < 0 || get_double(r, s_kv_usage, &kv_usage[i]) < 0)
            goto done;
        queued[i] = nw + in_flight_weight * inf;
        loads[i] = nw + nr + inf;
        running[i] = nr;
        queued_sum += queued[i];
        if (i == 0 || loads[i] < min_load) min_load = loads[i];
    }
    double abs_limit = min_load + p[P_BALANCE_ABS];
    double rel_limit = p[P_BALANCE_REL] * min_load;
    double limit = abs_limit >= rel_limit ? abs_limit : rel_limit;
    double kv_overload = p[P_KV_OVERLOAD];

    Py_ssize_t affinity = -1;
    double affinity_blocks = 0.0;
    Py_ssize_t ai = affinity_candidate;
    if (ai >= n) {
        PyErr_SetString(PyExc_ValueError, "affinity_candidate out of range");
        goto done;
    }
    if (ai >= 0 && !(loads[ai] > limit || kv_usage[ai] >= kv_overload)) {
        affinity = ai;
        affinity_blocks = PyFloat_AsDouble(PyList_GET_ITEM(matched, ai));
        if (affinity_blocks == -1.0 && PyErr_Occurred()) goto done;
        if (affinity_floor_obj != Py_None) {
            double floor_blocks = PyFloat_AsDouble(affinity_floor_obj);
            if (floor_blocks == -1.0 && PyErr_Occurred()) goto done;
            if (floor_blocks > affinity_blocks) affinity_blocks = floor_blocks;
        }
    }
    double prompt_tokens = p[P_PROMPT_TOKENS], block_size = p[P_BLOCK_SIZE];
    double prefill_rate = p[P_PREFILL_RATE], inv_batch = p[P_INV_BATCH];
    double mean_tokens = p[P_MEAN_TOKENS], duration_s = p[P_DURATION_S];
    double kv_high = p[P_KV_HIGH], kv_scale = p[P_KV_SCALE];
    double ext = p[P_EXTERNALITY_WEIGHT] * (queued_sum / (double)n);
    double kv_wait_weight = p[P_KV_WAIT_WEIGHT], out_tokens = p[P_OUT_TOKENS];
    double tpot_weight = p[P_TPOT_WEIGHT], backlog_weight = p[P_BACKLOG_WEIGHT], now = p[P_NOW];
    int slot_turnover = p[P_SLOT_TURNOVER] != 0.0;
    int slot_cost = p[P_SLOT_EXTERNALITY] != 0.0 && ext != 0.0;

    scores = PyDict_New();
    if (scores == NULL) goto done;
    double best_ttft = INFINITY, best_load = 0.0, best_wait = 0.0, affinity_score = 0.0, affinity_wait = 0.0;
    int best_waited = 0, affinity_waited = 0;
    Py_ssize_t chosen = -1;
    for (Py_ssize_t step = 0; step < n; step++) {
        Py_ssize_t i = offset + step < n ? offset + step : offset + step - n;
        PyObject *r = PyList_GET_ITEM(replicas, i);
        double kv = kv_usage[i], uncached;
        if (loads[i] > limit || kv >= kv_overload) {
            uncached = prompt_tokens; /* the hot-spot guard: no cache bonus */
        } else {
            double held = affinity_blocks;
            if (i != affinity) {
                held = PyFloat_AsDouble(PyList_GET_ITEM(matched, i));
                if (held == -1.0 && PyErr_Occurred()) goto done;
            }
            uncached = prompt_tokens - held * block_size;
        }
        double share = 1.0 - running[i] * inv_batch;
        double rate = prefill_rate * (share > 0.05 ? share : 0.05);
        double q = queued[i];
        double own_s = uncached / rate;
        double ttft = (q * mean_tokens + uncached) / rate;
        double busy = running[i] + q;
        double extra = ext != 0.0 ? ext * own_s : 0.0;
        PyObject *state = PyList_GET_ITEM(aligned, i);
        double max_num_seqs;
        if (get_double(r, s_max_num_seqs, &max_num_seqs) < 0) goto done;
        int waited = 0;
        double wait_s = 0.0;
        if (busy >= max_num_seqs) {
            double waiting_for = busy - max_num_seqs + 1;
            double turnover;
            if (slot_turnover_s(state, busy, slot_turnover, duration_s, &turnover) < 0) goto done;
            wait_s = waiting_for / max_num_seqs * turnover;
            waited = 1;
            double queue_s = q * mean_tokens / rate;
            if (slot_turnover) {
                if (wait_s > queue_s) ttft += wait_s - queue_s;
            } else {
                ttft += wait_s;
            }
            if (slot_cost) {
                double gap = wait_s - queue_s;
                double slot_s = wait_s / waiting_for;
                double rise = gap > 0 ? slot_s : gap + slot_s;
                if (rise > own_s) extra += ext * (rise - own_s);
            }
        }
        if (kv > kv_high) ttft += (kv - kv_high) * kv_scale;
        if (state != Py_None) {
            double backlog_until, owed, live;
            if (get_double(state, s_backlog_until, &backlog_until) < 0) goto done;
            double backlog_s = backlog_until - now;
            if (backlog_s > 0 && backlog_weight != 0.0) {
                double queue_ttft = backlog_weight * backlog_s + uncached / prefill_rate;
                if (queue_ttft > ttft) ttft = queue_ttft;
            }
            PyObject *d = PyObject_GetAttr(state, s_decodes);
            if (d == NULL) goto done;
            if (get_double(d, s_live, &live) < 0) {
                Py_DECREF(d);
                goto done;
            }
            if (live != 0.0 && tpot_weight != 0.0) {
                double start = backlog_s > 0 ? now + backlog_s : now;
                PyObject *heap = PyObject_GetAttr(d, s_heap);
                if (heap == NULL) {
                    Py_DECREF(d);
                    goto done;
                }
                double first = INFINITY;
                if (PyList_Check(heap) && PyList_GET_SIZE(heap) > 0) {
                    PyObject *entry = PyList_GET_ITEM(heap, 0);
                    if (PyList_Check(entry) && PyList_GET_SIZE(entry) > 0)
                        first = PyFloat_AsDouble(PyList_GET_ITEM(entry, 0));
                }
                Py_DECREF(heap);
                if (first == -1.0 && PyErr_Occurred()) {
                    Py_DECREF(d);
                    goto done;
                }
                if (first <= start) {
                    PyObject *arg = PyFloat_FromDouble(start);
                    PyObject *res = arg != NULL ? PyObject_CallMethodOneArg(d, s_at, arg) : NULL;
                    Py_XDECREF(arg);
                    if (res == NULL) {
                        Py_DECREF(d);
                        goto done;
                    }
                    Py_DECREF(res);
                }
                double total;
                if (get_double(d, s_total, &total) < 0) {
                    Py_DECREF(d);
                    goto done;
                }
                extra += tpot_weight * total * own_s;
            }
            Py_DECREF(d);
            if (get_double(state, s_kv_owed, &owed) < 0) goto done;
            if (owed != 0.0) {
                double cap_blocks;
                if (get_double(r, s_kv_capacity_blocks, &cap_blocks) < 0) goto done;
                double cap = cap_blocks * block_size;
                double over = owed + uncached + out_tokens - cap;
                if (over > 0 && cap > 0) extra += kv_wait_weight * over / cap * duration_s;
            }
        }
        ttft += extra;
        PyObject *score = PyFloat_FromDouble(ttft);
        if (score == NULL) goto done;
        int rc = PyDict_SetItem(scores, PyList_GET_ITEM(ids, i), score);
        Py_DECREF(score);
        if (rc < 0) goto done;
        if (i == affinity) {
            affinity_score = ttft;
            affinity_wait = wait_s;
            affinity_waited = waited;
        }
        if (ttft < best_ttft || (ttft == best_ttft && loads[i] < best_load)) {
            best_ttft = ttft;
            best_load = loads[i];
            best_wait = wait_s;
            best_waited = waited;
            chosen = i;
        }
    }
    if (affinity >= 0 && affinity_score <= best_ttft) {
        chosen = affinity; /* ties go to the session's replica */
        best_wait = affinity_wait;
        best_waited = affinity_waited;
    }
    Py_ssize_t c = chosen >= 0 ? chosen : n - 1; /* as Python's loads[-1] */
    int overloaded = loads[c] > limit || kv_usage[c] >= kv_overload;
    PyObject *waited_obj = best_waited && chosen >= 0 ? PyFloat_FromDouble(best_wait) : Py_NewRef(Py_None);
    if (waited_obj == NULL) goto done;
    result = Py_BuildValue("nnLOOO", chosen, affinity, (long long)affinity_blocks, scores, waited_obj,
                           overloaded ? Py_True : Py_False);
    Py_DECREF(waited_obj);
done:
    Py_XDECREF(scores);
    if (buf != stack_buf) PyMem_Free(buf);
    return result;
}

static PyMethodDef methods[] = {
    {"score_replicas", score_replicas, METH_VARARGS,
     "score_replicas(replicas, ids, matched, aligned, params, affinity_candidate, affinity_floor, offset)"
     " -> (chosen, affinity, affinity_blocks, scores, waited, chosen_overloaded)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_replica_scores", NULL, -1, methods};

PyMODINIT_FUNC PyInit__replica_scores(void) {
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL;
    INTERN(s_num_waiting, "num_waiting")
    INTERN(s_num_running, "num_running")
    INTERN(s_in_flight, "in_flight")
    INTERN(s_kv_usage, "kv_usage")
    INTERN(s_max_num_seqs, "max_num_seqs")
    INTERN(s_kv_capacity_blocks, "kv_capacity_blocks")
    INTERN(s_backlog_until, "backlog_until")
    INTERN(s_kv_owed, "kv_owed")
    INTERN(s_decodes, "decodes")
    INTERN(s_slot_rate, "slot_rate")
    INTERN(s_slot_count, "slot_count")
    INTERN(s_live, "live")
    INTERN(s_heap, "heap")
    INTERN(s_total, "total")
    INTERN(s_at, "at")
#undef INTERN
    return PyModule_Create(&module);
}
