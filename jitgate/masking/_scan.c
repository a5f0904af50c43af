/* The strings of a JSON body that hold a secret word, found in one pass over its bytes.
 *
 * string_hits(body, lowered, exact, max_strings[, named_maps, clean]) -> list | None
 *
 * For every JSON string token of `body` that holds one of the literals (`lowered`: lower-case
 * ASCII literals matched in any ASCII case; `exact`: literals matched as written), in order and
 * once each, a tuple (start, end, is_key, key_start, key_end): the offsets of its opening and
 * closing quotes; is_key 1 when the next byte after white space is ':' (an object key); for a
 * value, the quotes of its key, or -1, -1 for an array element or a top-level string; for a key,
 * the quotes of the key of the object it is a member of (`"annotations"` for an annotation's
 * name), or -1, -1 when that object is an array element or the top level.
 *
 * None when the scan cannot read the body exactly: a \u or \/ escape (either could spell a literal
 * in other bytes), a quote that does not close, a value after ':' whose key is not a string, or more than
 * `max_strings` strings with hits. The caller then parses the body instead. Every literal has a
 * character JSON allows only inside strings (the caller checks), so a hit always lies inside one
 * string, whose quotes are the nearest unescaped ones on each side.
 *
 * With `named_maps` (a tuple of bytes) and `clean` (a dict), the hits the caller would pass over
 * are left out: a key unless the object it is a member of is the value of one of `named_maps`, and
 * a value whose span (from its key's opening quote, or its own without a key, to its closing
 * quote) is in `clean`, a value known to pass the detectors unmasked. `clean` maps a span to
 * whether the value is a `name` that says secret: for those the object holding it must not also
 * have a non-empty string `value` member (an env var with a value of its own), else None. The
 * caller then sees only what it has not decided before: on a pod list after the first, nothing.
 *
 * Same results as jitgate.masking.hits.py_string_hits (tests/test_masking_hits.py checks both on
 * generated bodies); this one is what makes masking a pod list cost a fraction of parsing it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_LITERALS 64

typedef struct {
    const unsigned char *bytes;
    Py_ssize_t len;
} literal;

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

static unsigned char lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c; }

/* Whether the quote at `pos` is escaped: an odd number of backslashes right before it. */
static int escaped(const unsigned char *s, Py_ssize_t pos) {
    Py_ssize_t n = 0;
    while (pos > 0 && s[pos - 1] == '\\') { n++; pos--; }
    return n & 1;
}

static Py_ssize_t quote_before(const unsigned char *s, Py_ssize_t pos) {
    while (--pos >= 0) {
        if (s[pos] == '"' && !escaped(s, pos)) return pos;
    }
    return -1;
}

static Py_ssize_t quote_after(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos) {
    for (; pos < n; pos++) {
        if (s[pos] == '"' && !escaped(s, pos)) return pos;
    }
    return -1;
}

/* The key before `pos` (just after it: the colon, then white space): its quotes, or -1 when there
 * is no colon (an array element, the top). Returns 0, or -1 when what precedes the colon is no string. */
static int key_before(const unsigned char *s, Py_ssize_t pos, Py_ssize_t *key_start, Py_ssize_t *key_end) {
    *key_start = *key_end = -1;
    Py_ssize_t p = pos - 1;
    while (p >= 0 && is_ws(s[p])) p--;
    if (p < 0 || s[p] != ':') return 0;
    p--;
    while (p >= 0 && is_ws(s[p])) p--;
    if (p < 0 || s[p] != '"') return -1;
    *key_end = p;
    *key_start = quote_before(s, p);
    return *key_start < 0 ? -1 : 0;
}

/* The opening brace of the object whose member starts at `pos` (outside any string): back over
 * the members before it, whole strings and nested containers skipped; -1 at an array or the top. */
static Py_ssize_t object_start(const unsigned char *s, Py_ssize_t pos) {
    Py_ssize_t depth = 0;
    for (Py_ssize_t p = pos - 1; p >= 0; p--) {
        unsigned char c = s[p];
        if (c == '"') {
            p = quote_before(s, p);  /* a whole string, read backwards */
            if (p < 0) return -1;
        } else if (c == '}' || c == ']') {
            depth++;
        } else if (c == '{' || c == '[') {
            if (depth == 0) return c == '{' ? p : -1;
            depth--;
        }
    }
    return -1;
}

static int is_special(unsigned char c) { return c == '"' || c == '{' || c == '}' || c == '[' || c == ']'; }

/* After a key's closing quote: `: "..."` with at least one character. */
static int string_value_follows(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos) {
    while (pos < n && is_ws(s[pos])) pos++;
    if (pos >= n || s[pos] != ':') return 0;
    pos++;
    while (pos < n && is_ws(s[pos])) pos++;
    return pos + 1 < n && s[pos] == '"' && s[pos + 1] != '"';
}

/* Whether the string between the quotes at `open` and `close` is `"value"` followed by a value string. */
static int value_member(const unsigned char *s, Py_ssize_t n, Py_ssize_t open, Py_ssize_t close) {
    return close - open == 6 && memcmp(s + open + 1, "value", 5) == 0 && string_value_follows(s, n, close + 1);
}

#define BACK_WINDOW 8192 /* bytes looked back for the start of the object; past it: cannot tell */

/* 1 when the object holding the `name` member whose value opens at `name_start` also has a
 * non-empty string `value` member, 0 when not, -1 when it cannot tell (hits._has_value's NeedsWalk):
 * the members after the name read forwards to the closing brace, those before it backwards. */
static int has_value(const unsigned char *s, Py_ssize_t n, Py_ssize_t name_start) {
    Py_ssize_t pos = quote_after(s, n, name_start + 1), depth = 0;
    if (pos < 0) return -1;
    for (pos++;; pos++) {
        while (pos < n && !is_special(s[pos])) pos++;
        if (pos >= n) return -1;
        unsigned char c = s[pos];
        if (c == '"') {
            Py_ssize_t end = quote_after(s, n, pos + 1);
            if (end < 0) return -1;
            if (depth == 0 && value_member(s, n, pos, end)) return 1;
            pos = end;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (depth) {
            depth--;
        } else {
            break;
        }
    }
    Py_ssize_t low = name_start > BACK_WINDOW ? name_start - BACK_WINDOW : 0, at = name_start;
    for (depth = 0;;) {
        for (at--; at >= low && !is_special(s[at]); at--) {}
        if (at < low) return -1;
        unsigned char c = s[at];
        if (c == '"') {
            Py_ssize_t start = quote_before(s, at);
            if (start < 0) return -1;
            if (depth == 0 && value_member(s, n, start, at)) return 1;
            at = start;
        } else if (c == '}' || c == ']') {
            depth++;
        } else if (depth) {
            depth--;
        } else {
            return 0;
        }
        if (at <= low) return -1;
    }
}

/* Whether the key between the quotes at `open` and `close` is one of `names` (a tuple of bytes). */
static int named(const unsigned char *s, Py_ssize_t open, Py_ssize_t close, PyObject *names) {
    Py_ssize_t len = close - open - 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (PyBytes_Check(name) && PyBytes_GET_SIZE(name) == len && memcmp(PyBytes_AS_STRING(name), s + open + 1, (size_t)len) == 0)
            return 1;
    }
    return 0;
}

/* What the caller knows of a hit already (see the top): 1 pass over it, 0 report it, -1 the body
 * needs the walk, -2 an error is set. */
static int decided(const unsigned char *s, Py_ssize_t n, Py_ssize_t start, Py_ssize_t end, int is_key,
                   Py_ssize_t key_start, Py_ssize_t key_end, PyObject *named_maps, PyObject *clean) {
    if (is_key) return !(key_start >= 0 && named(s, key_start, key_end, named_maps));
    Py_ssize_t from = key_start >= 0 ? key_start : start;
    PyObject *span = PyBytes_FromStringAndSize((const char *)s + from, end + 1 - from);
    if (span == NULL) return -2;
    PyObject *env_name = PyDict_GetItemWithError(clean, span);  /* borrowed */
    Py_DECREF(span);
    if (env_name == NULL) return PyErr_Occurred() ? -2 : 0;
    if (env_name != Py_True) return 1;
    int value = has_value(s, n, start);
    return value == 0 ? 1 : -1;
}

static int load_literals(PyObject *seq, literal *out, int *count, const char *what) {
    if (!PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of bytes", what);
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n > MAX_LITERALS) {
        PyErr_Format(PyExc_ValueError, "at most %d %s literals", MAX_LITERALS, what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(seq, i);
        if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) == 0) {
            PyErr_Format(PyExc_TypeError, "%s literals must be non-empty bytes", what);
            return -1;
        }
        out[i].bytes = (const unsigned char *)PyBytes_AS_STRING(item);
        out[i].len = PyBytes_GET_SIZE(item);
    }
    *count = (int)n;
    return 0;
}

/* Which byte pairs can start a literal, as a bitmap over (byte << 8 | next byte) of the body's raw
 * bytes: a lowered literal's first two bytes in every case that lower() reads as them, an exact
 * literal's as written, a one-byte literal's byte before any other. One lookup per byte of the body
 * rejects nearly every position (JSON is full of the letters the literals start with, rarely of
 * their pairs). Built once per pair of literal tuples: the caller passes the same ones every call,
 * and a reference to each is kept so that their identity stays theirs. */
static unsigned char pairs[65536 / 8];
static PyObject *pairs_lowered, *pairs_exact;

static void set_pair(unsigned first, unsigned second) {
    unsigned v = first << 8 | second;
    pairs[v >> 3] |= (unsigned char)(1 << (v & 7));
}

/* The bytes that lower() reads as `b` when `folds`, else `b` alone; their count. */
static int variants(unsigned char b, int folds, unsigned char out[2]) {
    if (!folds) { out[0] = b; return 1; }
    if (b >= 'A' && b <= 'Z') return 0;  /* lower() never yields an upper-case letter */
    out[0] = b;
    if (b >= 'a' && b <= 'z') { out[1] = (unsigned char)(b - 32); return 2; }
    return 1;
}

static void add_literals(const literal *lits, int count, int folds) {
    for (int i = 0; i < count; i++) {
        unsigned char first[2], second[2];
        int n1 = variants(lits[i].bytes[0], folds, first);
        for (int a = 0; a < n1; a++) {
            if (lits[i].len == 1) {
                for (unsigned next = 0; next < 256; next++) set_pair(first[a], next);
                continue;
            }
            int n2 = variants(lits[i].bytes[1], folds, second);
            for (int b = 0; b < n2; b++) set_pair(first[a], second[b]);
        }
    }
}

static void build_pairs(PyObject *lowered_seq, const literal *lowered, int n_lowered,
                        PyObject *exact_seq, const literal *exact, int n_exact) {
    if (lowered_seq == pairs_lowered && exact_seq == pairs_exact) return;
    memset(pairs, 0, sizeof pairs);
    add_literals(lowered, n_lowered, 1);
    add_literals(exact, n_exact, 0);
    Py_INCREF(lowered_seq);
    Py_INCREF(exact_seq);
    Py_XSETREF(pairs_lowered, lowered_seq);
    Py_XSETREF(pairs_exact, exact_seq);
}

static PyObject *string_hits(PyObject *self, PyObject *args) {
    Py_buffer body;
    PyObject *lowered_seq, *exact_seq, *named_maps = NULL, *clean = NULL;
    Py_ssize_t max_strings;
    literal lowered[MAX_LITERALS], exact[MAX_LITERALS];
    int n_lowered = 0, n_exact = 0;

    if (!PyArg_ParseTuple(args, "y*O!O!n|O!O!", &body, &PyTuple_Type, &lowered_seq, &PyTuple_Type, &exact_seq, &max_strings,
                          &PyTuple_Type, &named_maps, &PyDict_Type, &clean))
        return NULL;
    if ((named_maps == NULL) != (clean == NULL)) {
        PyBuffer_Release(&body);
        PyErr_SetString(PyExc_TypeError, "named_maps and clean go together");
        return NULL;
    }
    if (load_literals(lowered_seq, lowered, &n_lowered, "lowered") < 0 || load_literals(exact_seq, exact, &n_exact, "exact") < 0) {
        PyBuffer_Release(&body);
        return NULL;
    }
    build_pairs(lowered_seq, lowered, n_lowered, exact_seq, exact, n_exact);

    const unsigned char *s = (const unsigned char *)body.buf;
    Py_ssize_t n = body.len;
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyBuffer_Release(&body);
        return NULL;
    }
    Py_ssize_t found = 0;
    for (const unsigned char *b = memchr(s, '\\', (size_t)n); b != NULL && b + 1 < s + n;
         b = memchr(b + 2, '\\', (size_t)(s + n - b - 2))) {
        /* \u and \/ could spell a literal's bytes otherwise (no encoder kube uses writes either) */
        if (b[1] == 'u' || b[1] == '/') goto unreadable;  /* an escape pair: the next backslash starts after it */
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned v = (unsigned)s[i] << 8 | (i + 1 < n ? s[i + 1] : 0);
        if (!(pairs[v >> 3] >> (v & 7) & 1)) continue;
        unsigned char c = s[i], lc = lower(c);
        int hit = 0;
        for (int k = 0; k < n_lowered && !hit; k++) {
            const literal *lit = &lowered[k];
            if (lit->bytes[0] != lc || i + lit->len > n) continue;
            Py_ssize_t j = 1;
            while (j < lit->len && lower(s[i + j]) == lit->bytes[j]) j++;
            hit = j == lit->len;
        }
        for (int k = 0; k < n_exact && !hit; k++) {
            const literal *lit = &exact[k];
            hit = lit->bytes[0] == c && i + lit->len <= n && memcmp(s + i, lit->bytes, (size_t)lit->len) == 0;
        }
        if (!hit) continue;
        Py_ssize_t start = quote_before(s, i), end = quote_after(s, n, i);
        if (start < 0 || end < 0) goto unreadable;
        Py_ssize_t after = end + 1;
        while (after < n && is_ws(s[after])) after++;
        int is_key = after < n && s[after] == ':';
        Py_ssize_t key_start = -1, key_end = -1;
        if (!is_key) {
            if (key_before(s, start, &key_start, &key_end) < 0) goto unreadable;
        } else {
            Py_ssize_t brace = object_start(s, start);
            if (brace >= 0 && key_before(s, brace, &key_start, &key_end) < 0) goto unreadable;
        }
        if (++found > max_strings) goto unreadable;
        i = end;  /* the rest of this string: it is reported already */
        if (clean != NULL) {
            int known = decided(s, n, start, end, is_key, key_start, key_end, named_maps, clean);
            if (known == -2) {
                Py_DECREF(out);
                PyBuffer_Release(&body);
                return NULL;
            }
            if (known == -1) goto unreadable;
            if (known == 1) continue;
        }
        PyObject *item = Py_BuildValue("(nninn)", start, end, is_key, key_start, key_end);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            PyBuffer_Release(&body);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyBuffer_Release(&body);
    return out;

unreadable:
    Py_DECREF(out);
    PyBuffer_Release(&body);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"string_hits", string_hits, METH_VARARGS,
     "string_hits(body, lowered, exact, max_strings[, named_maps, clean]) -> list of (start, end, is_key, key_start, key_end), or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", "The strings of a JSON body that hold a secret word.", -1, methods};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
