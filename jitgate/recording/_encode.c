/* The two encodings every recorded call pays for, each in one pass in C.
 *
 * tnetstring(value, min_ref=0) -> bytes | list[bytes] | None
 *     A flow state as mitmproxy's tnetstring (what `mitmproxy.io.FlowWriter` writes): dict items
 *     last-first as mitmproxy orders them. Only the plain types (bytes, str, None, bool, int, float,
 *     dict, list, tuple; exact types, no subclasses); None for anything else, and the caller then
 *     writes the whole value in Python (jitgate.recording.flowfile.py_dumps, the twin).
 *     Two passes: the first measures every container's body in visiting order, the second writes
 *     into one buffer of the exact size, so nothing is copied twice. With `min_ref`, the pieces to
 *     write one after the other (os.writev): bytes values of `min_ref` bytes or more (the bodies)
 *     are not copied at all, the list holds them between the runs written around them.
 *
 * json_text(data) -> bytes
 *     UTF-8 text as the inside of a JSON string, as `json.dumps(text, ensure_ascii=False)[1:-1]`
 *     writes it: `"` and `\` escaped, \b \f \n \r \t in short form, other control characters as
 *     \u00XX, everything else (UTF-8 included) as it is (jitgate.recording.har.py_json_text, the twin).
 *
 * tests/test_recording_files.py checks both against their twins and mitmproxy on generated values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 64

/* -- tnetstring -------------------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t *sizes; /* container body sizes, in visiting order */
    Py_ssize_t count, cap, next;
    /* pieces mode (min_ref > 0): bytes values of at least min_ref bytes are not copied, the output
     * refers to them; ref_bytes is their total, refs/ref_at each one and where it goes */
    Py_ssize_t min_ref, ref_bytes;
    PyObject **refs;
    Py_ssize_t *ref_at, nrefs, refcap;
    char *base;
} sizes_t;

static int digits(Py_ssize_t n) {
    int d = 1;
    while (n >= 10) { n /= 10; d++; }
    return d;
}

/* The framed size (length, colon, body, type byte) of a body of `n` bytes. */
static Py_ssize_t framed(Py_ssize_t n) { return digits(n) + 1 + n + 1; }

static int push(sizes_t *s, Py_ssize_t value, Py_ssize_t *slot) {
    if (s->count == s->cap) {
        Py_ssize_t cap = s->cap ? s->cap * 2 : 64;
        Py_ssize_t *grown = PyMem_Realloc(s->sizes, cap * sizeof(Py_ssize_t));
        if (grown == NULL) { PyErr_NoMemory(); return -1; }
        s->sizes = grown;
        s->cap = cap;
    }
    *slot = s->count;
    s->sizes[s->count++] = value;
    return 0;
}

/* Text of an int or float as Python's str()/repr() writes it (a new reference, or NULL). */
static PyObject *number_text(PyObject *value) {
    PyObject *text = PyLong_CheckExact(value) ? PyObject_Str(value) : PyObject_Repr(value);
    return text;
}

/* A dict's items, last first (mitmproxy's order), as borrowed references in `pairs` (2 per item);
 * `pairs` is `stack` when it fits, else allocated (the caller frees it when it is not `stack`). */
static PyObject **items_last_first(PyObject *dict, PyObject **stack, Py_ssize_t stack_items, Py_ssize_t *count) {
    Py_ssize_t n = PyDict_GET_SIZE(dict), i = n, pos = 0;
    PyObject **pairs = stack, *k, *v;
    if (n > stack_items) {
        pairs = PyMem_Malloc(2 * n * sizeof(PyObject *));
        if (pairs == NULL) { PyErr_NoMemory(); return NULL; }
    }
    while (PyDict_Next(dict, &pos, &k, &v) && i > 0) {
        i--;
        pairs[2 * i] = k;
        pairs[2 * i + 1] = v;
    }
    *count = n;
    return pairs;
}

#define STACK_ITEMS 32

/* The encoded size of `value`, or -1 (an error set) / -2 (a type this encoder leaves to Python). */
static Py_ssize_t measure(PyObject *value, sizes_t *s, int depth) {
    if (depth > MAX_DEPTH) return -2;
    PyTypeObject *type = Py_TYPE(value);
    if (type == &PyBytes_Type) {
        if (s->min_ref > 0 && PyBytes_GET_SIZE(value) >= s->min_ref) s->ref_bytes += PyBytes_GET_SIZE(value);
        return framed(PyBytes_GET_SIZE(value));
    }
    if (type == &PyUnicode_Type) {
        Py_ssize_t n;
        if (PyUnicode_AsUTF8AndSize(value, &n) == NULL) return -1;
        return framed(n);
    }
    if (value == Py_None) return 3;
    if (type == &PyBool_Type) return value == Py_True ? 7 : 8;
    if (type == &PyLong_Type || type == &PyFloat_Type) {
        PyObject *text = number_text(value);
        if (text == NULL) return -1;
        Py_ssize_t n = PyUnicode_GET_LENGTH(text);
        Py_DECREF(text);
        return framed(n);
    }
    if (type != &PyDict_Type && type != &PyList_Type && type != &PyTuple_Type) return -2;
    Py_ssize_t slot, body = 0, n;
    if (push(s, 0, &slot) < 0) return -1;
    PyObject *stack[2 * STACK_ITEMS], **items;
    if (type == &PyDict_Type) {
        items = items_last_first(value, stack, STACK_ITEMS, &n);
        if (items == NULL) return -1;
        n *= 2;
    } else {
        n = PySequence_Fast_GET_SIZE(value);
        items = PySequence_Fast_ITEMS(value);
    }
    Py_ssize_t result = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t a = measure(items[i], s, depth + 1);
        if (a < 0) { result = a; break; }
        body += a;
    }
    if (type == &PyDict_Type && items != stack) PyMem_Free(items);
    if (result < 0) return result;
    s->sizes[slot] = body;
    return framed(body);
}

static char *frame_head(char *out, Py_ssize_t n) {
    return out + sprintf(out, "%zd:", n);
}

/* Writes `value` at `out` (measured before, so everything fits); returns the end, NULL on error. */
static char *write_value(PyObject *value, sizes_t *s, char *out) {
    PyTypeObject *type = Py_TYPE(value);
    if (type == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(value);
        out = frame_head(out, n);
        if (s->min_ref > 0 && n >= s->min_ref) {  /* referred to, not copied: its place is noted */
            if (s->nrefs == s->refcap) {
                Py_ssize_t cap = s->refcap ? s->refcap * 2 : 8;
                PyObject **refs = PyMem_Realloc(s->refs, cap * sizeof(PyObject *));
                if (refs == NULL) { PyErr_NoMemory(); return NULL; }
                s->refs = refs;
                Py_ssize_t *at = PyMem_Realloc(s->ref_at, cap * sizeof(Py_ssize_t));
                if (at == NULL) { PyErr_NoMemory(); return NULL; }
                s->ref_at = at;
                s->refcap = cap;
            }
            s->refs[s->nrefs] = value;
            s->ref_at[s->nrefs++] = out - s->base;
            *out = ',';
            return out + 1;
        }
        memcpy(out, PyBytes_AS_STRING(value), n);
        out[n] = ',';
        return out + n + 1;
    }
    if (type == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *utf8 = PyUnicode_AsUTF8AndSize(value, &n);
        if (utf8 == NULL) return NULL;
        out = frame_head(out, n);
        memcpy(out, utf8, n);
        out[n] = ';';
        return out + n + 1;
    }
    if (value == Py_None) { memcpy(out, "0:~", 3); return out + 3; }
    if (type == &PyBool_Type) {
        if (value == Py_True) { memcpy(out, "4:true!", 7); return out + 7; }
        memcpy(out, "5:false!", 8);
        return out + 8;
    }
    if (type == &PyLong_Type || type == &PyFloat_Type) {
        PyObject *text = number_text(value);
        if (text == NULL) return NULL;
        Py_ssize_t n;
        const char *utf8 = PyUnicode_AsUTF8AndSize(text, &n);
        if (utf8 == NULL) { Py_DECREF(text); return NULL; }
        out = frame_head(out, n);
        memcpy(out, utf8, n);
        out[n] = type == &PyLong_Type ? '#' : '^';
        Py_DECREF(text);
        return out + n + 1;
    }
    /* a container, measured in this same visiting order */
    Py_ssize_t n, body = s->sizes[s->next++];
    PyObject *stack[2 * STACK_ITEMS], **items;
    out = frame_head(out, body);
    if (type == &PyDict_Type) {
        items = items_last_first(value, stack, STACK_ITEMS, &n);
        if (items == NULL) return NULL;
        n *= 2;
    } else {
        n = PySequence_Fast_GET_SIZE(value);
        items = PySequence_Fast_ITEMS(value);
    }
    for (Py_ssize_t i = 0; i < n && out != NULL; i++) out = write_value(items[i], s, out);
    if (type == &PyDict_Type && items != stack) PyMem_Free(items);
    if (out == NULL) return NULL;
    *out = type == &PyDict_Type ? '}' : ']';
    return out + 1;
}

/* The pieces of a value written in pieces mode: the copied runs between the referred-to values. */
static PyObject *pieces_of(sizes_t *s, Py_ssize_t written) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    Py_ssize_t done = 0;
    for (Py_ssize_t i = 0; i <= s->nrefs; i++) {
        Py_ssize_t at = i < s->nrefs ? s->ref_at[i] : written;
        PyObject *run = PyBytes_FromStringAndSize(s->base + done, at - done);
        if (run == NULL || PyList_Append(out, run) < 0) { Py_XDECREF(run); Py_DECREF(out); return NULL; }
        Py_DECREF(run);
        if (i < s->nrefs && PyList_Append(out, s->refs[i]) < 0) { Py_DECREF(out); return NULL; }
        done = at;
    }
    return out;
}

static PyObject *tnetstring(PyObject *self, PyObject *args) {
    PyObject *value;
    sizes_t s = {NULL, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, NULL};
    if (!PyArg_ParseTuple(args, "O|n", &value, &s.min_ref)) return NULL;
    Py_ssize_t size = measure(value, &s, 0);
    PyObject *out = NULL;
    if (size < 0) {
        if (size == -2) out = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t copied = size - s.ref_bytes;
    /* (sprintf's NUL after a length prefix always lands on a byte written after it) */
    if (s.min_ref > 0) {
        s.base = PyMem_Malloc(copied + 1);
        if (s.base == NULL) { PyErr_NoMemory(); goto done; }
    } else {
        out = PyBytes_FromStringAndSize(NULL, size);
        if (out == NULL) goto done;
        s.base = PyBytes_AS_STRING(out);
    }
    char *end = write_value(value, &s, s.base);
    if (end != NULL && end - s.base != copied) {
        PyErr_SetString(PyExc_RuntimeError, "tnetstring: a value changed while it was written");
        end = NULL;
    }
    if (end == NULL) {
        Py_CLEAR(out);
    } else if (s.min_ref > 0) {
        out = pieces_of(&s, copied);
    }
    if (s.min_ref > 0) PyMem_Free(s.base);
done:
    PyMem_Free(s.sizes);
    PyMem_Free(s.refs);
    PyMem_Free(s.ref_at);
    return out;
}

/* -- JSON string text ------------------------------------------------------------------------- */

/* 0: as it is; 1: two bytes (\" \\ \b \f \n \r \t); 2: six bytes (\u00XX) */
static unsigned char json_kind[256];
static char json_short[256];

static void json_tables(void) {
    for (int c = 0; c < 0x20; c++) json_kind[c] = 2;
    const char *from = "\"\\\b\f\n\r\t", *to = "\"\\bfnrt";
    for (int i = 0; from[i]; i++) {
        json_kind[(unsigned char)from[i]] = 1;
        json_short[(unsigned char)from[i]] = to[i];
    }
}

/* Eight bytes at a time: 0x80 in each byte of `w` that needs an escape (a quote, a backslash, a
 * control character), exactly (no carries cross bytes). */
#define ONES 0x0101010101010101ULL
#define LOW7 0x7F7F7F7F7F7F7F7FULL
#define HIGH 0x8080808080808080ULL

static inline uint64_t zero_bytes(uint64_t x) { return ~(((x & LOW7) + LOW7) | x | LOW7); }

static inline uint64_t special_bytes(uint64_t w) {
    uint64_t below_space = ~(((w & LOW7) + ONES * 0x60) | w) & HIGH;
    return zero_bytes(w ^ (ONES * '"')) | zero_bytes(w ^ (ONES * '\\')) | below_space;
}

static inline uint64_t load(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

static char *escape(char *o, unsigned char c) {
    static const char hex[] = "0123456789abcdef";
    *o++ = '\\';
    if (json_kind[c] == 1) {
        *o++ = json_short[c];
        return o;
    }
    memcpy(o, "u00", 3);
    o[3] = hex[c >> 4];
    o[4] = hex[c & 15];
    return o + 5;
}

/* Room for `need` more bytes at `*o` in the scratch buffer (grown by doubling): 0, or -1 (no memory). */
static int room(char **buf, Py_ssize_t *cap, char **o, Py_ssize_t need) {
    Py_ssize_t used = *o - *buf;
    if (used + need <= *cap) return 0;
    Py_ssize_t cap2 = *cap * 2 > used + need ? *cap * 2 : used + need;
    char *grown = PyMem_Realloc(*buf, cap2);
    if (grown == NULL) return -1;
    *buf = grown;
    *cap = cap2;
    *o = grown + used;
    return 0;
}

static PyObject *json_text(PyObject *self, PyObject *arg) {
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *in = data.buf;
    Py_ssize_t n = data.len, i = 0, done = 0;  /* `done`: bytes of `in` written */
    Py_ssize_t cap = n + n / 4 + 64;  /* a pod list needs about an eighth more */
    char *buf = PyMem_Malloc(cap), *o = buf;
    if (buf == NULL) goto no_memory;
    for (; i + 8 <= n; i += 8) {
        uint64_t s = special_bytes(load(in + i));
        while (s) {
            Py_ssize_t at = i + (__builtin_ctzll(s) >> 3);
            if (room(&buf, &cap, &o, at - done + 6) < 0) goto no_memory;
            memcpy(o, in + done, at - done);
            o = escape(o + (at - done), in[at]);
            done = at + 1;
            s &= s - 1;
        }
    }
    for (; i < n; i++) {
        if (json_kind[in[i]]) {
            if (room(&buf, &cap, &o, i - done + 6) < 0) goto no_memory;
            memcpy(o, in + done, i - done);
            o = escape(o + (i - done), in[i]);
            done = i + 1;
        }
    }
    PyObject *out;
    if (done == 0 && PyBytes_CheckExact(arg)) {  /* nothing to escape */
        Py_INCREF(arg);
        out = arg;
    } else {
        if (room(&buf, &cap, &o, n - done) < 0) goto no_memory;
        memcpy(o, in + done, n - done);
        o += n - done;
        out = PyBytes_FromStringAndSize(buf, o - buf);
    }
    PyMem_Free(buf);
    PyBuffer_Release(&data);
    return out;
no_memory:
    PyMem_Free(buf);
    PyBuffer_Release(&data);
    return PyErr_NoMemory();
}

static PyMethodDef methods[] = {
    {"tnetstring", tnetstring, METH_VARARGS,
     "tnetstring(value, min_ref=0) -> bytes as mitmproxy's tnetstring writes it (with min_ref: a list of "
     "pieces, bytes values of min_ref bytes or more referred to, not copied), or None for a type left to Python"},
    {"json_text", json_text, METH_O, "json_text(utf8) -> the inside of a JSON string (json.dumps, ensure_ascii=False)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_encode", "The encodings of a recorded call.", -1, methods};

PyMODINIT_FUNC PyInit__encode(void) {
    json_tables();
    return PyModule_Create(&module);
}
