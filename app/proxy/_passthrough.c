/* The per-token step of a relayed stream, compiled: `app/proxy/passthrough.py` is the same thing in
 * Python (and the reference the tests hold this to), used when this module is not built.
 *
 * Why C: once a stream is under way every read from the engine is one chunk holding one SSE event,
 * and all the proxy does with it is check it and pass it on. In Python those few checks cost more
 * than the write itself (bench/RESULTS.md); here they cost a few hundred nanoseconds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

#define MAX_CHUNKS 64 /* chunks in one read handled here; more go the slow way */

typedef struct {
    PyObject_HEAD
    char edge;       /* the engine's response parser is between two chunks */
    char passing;     /* open_passthrough() was called: the sink wants whole events passed straight on */
    char strip;      /* finishing and usage events need the sink (it removes the usage chunk) */
    double last_data;
    Py_ssize_t passed; /* chunks passed on here since the relay began */
    PyObject *write;   /* the client transport's write */
    PyObject *seen;    /* called with each chunk's events (the observer's tail) */
    PyObject *clock;   /* the event loop's time() */
    PyObject *writer;  /* its `closed` ends the passthrough */
} RelayBase;

static PyObject *str_slow; /* "_slow_received" */
static PyObject *str_closed;

static int
RelayBase_traverse(RelayBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->write);
    Py_VISIT(self->seen);
    Py_VISIT(self->clock);
    Py_VISIT(self->writer);
    return 0;
}

static int
RelayBase_clear(RelayBase *self)
{
    self->passing = 0;
    Py_CLEAR(self->write);
    Py_CLEAR(self->seen);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->writer);
    return 0;
}

static void
RelayBase_dealloc(RelayBase *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    RelayBase_clear(self);
    tp->tp_free((PyObject *)self);
}

static int
hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int
has(const char *p, Py_ssize_t n, const char *needle, size_t k)
{
    return n >= (Py_ssize_t)k && memmem(p, (size_t)n, needle, k) != NULL;
}

/* The closing events of the Responses and Messages APIs (sse._LAST_EVENTS). */
static const char *const LAST_EVENTS[] = {
    "event: response.completed",
    "event: response.failed",
    "event: response.incomplete",
    "event: message_stop",
};

/* Whether the last of these events (ending with a blank line, no CR) closes its stream. */
static int
is_last_event(const char *ev, Py_ssize_t size)
{
    Py_ssize_t start = 0;
    for (Py_ssize_t i = size - 3; i >= 1; i--) {
        if (ev[i] == '\n' && ev[i - 1] == '\n') {
            start = i + 1;
            break;
        }
    }
    for (size_t k = 0; k < sizeof(LAST_EVENTS) / sizeof(LAST_EVENTS[0]); k++) {
        size_t n = strlen(LAST_EVENTS[k]);
        if ((size_t)(size - start) >= n && memcmp(ev + start, LAST_EVENTS[k], n) == 0) return 1;
    }
    return 0;
}

/* After a read was passed on: its events to `seen`, the time of the read. -1: error set. */
static int
note(RelayBase *self, const char *p, const Py_ssize_t *starts, const Py_ssize_t *sizes, int count)
{
    PyObject *res;
    for (int i = 0; i < count; i++) {
        PyObject *events = PyBytes_FromStringAndSize(p + starts[i], sizes[i]);
        if (events == NULL) return -1;
        res = PyObject_CallOneArg(self->seen, events);
        Py_DECREF(events);
        if (res == NULL) return -1;
        Py_DECREF(res);
    }
    res = PyObject_CallNoArgs(self->clock);
    if (res == NULL) return -1;
    double now = PyFloat_AsDouble(res);
    Py_DECREF(res);
    if (now == -1.0 && PyErr_Occurred()) return -1;
    self->last_data = now;
    return 0;
}

/* 1: passed on; 0: not for here (nothing done); -1: error set, nothing sent. */
static int
pass_on(RelayBase *self, PyObject *data)
{
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data), pos = 0;
    Py_ssize_t starts[MAX_CHUNKS], sizes[MAX_CHUNKS];
    int count = 0;

    while (pos < len) {
        Py_ssize_t size = 0;
        int digits = 0, v;
        /* The chunk size: hex digits and CRLF, nothing else (no extensions, no padding). */
        while (pos < len && (v = hexval(p[pos])) >= 0) {
            if (++digits > 8) return 0;
            size = size * 16 + v;
            pos++;
        }
        if (digits == 0 || size == 0) return 0; /* not a chunk, or the last one */
        if (len - pos < 2 || p[pos] != '\r' || p[pos + 1] != '\n') return 0;
        pos += 2;
        if (len - pos < size + 2) return 0; /* the chunk continues in a later read */
        const char *ev = p + pos;
        if (ev[size] != '\r' || ev[size + 1] != '\n') return 0;
        /* Its payload: sse.passes_untouched, check for check. */
        if (size < 8 || ev[size - 1] != '\n' || ev[size - 2] != '\n' || memchr(ev, '\r', size) != NULL)
            return 0;
        if (memcmp(ev + size - 8, "[DONE]\n\n", 8) == 0) return 0;
        if (memcmp(ev, "event: ", 7) == 0) {
            if (is_last_event(ev, size)) return 0;
        } else if (memcmp(ev, "data: ", 6) != 0) {
            return 0;
        }
        if (self->strip &&
            (has(ev, size, "\"finish_reason\":\"", 17) || has(ev, size, "\"usage\"", 7)))
            return 0;
        if (count == MAX_CHUNKS) return 0;
        starts[count] = pos;
        sizes[count] = size;
        count++;
        pos += size + 2;
    }
    if (count == 0) return 0;

    PyObject *closed = PyObject_GetAttr(self->writer, str_closed);
    if (closed == NULL) return -1;
    int is_closed = PyObject_IsTrue(closed);
    Py_DECREF(closed);
    if (is_closed) return is_closed < 0 ? -1 : 0;

    PyObject *res = PyObject_CallOneArg(self->write, data);
    if (res == NULL) return -1;
    Py_DECREF(res);
    self->passed += count;
    /* Sent: whatever fails from here must not send it again the slow way. The passthrough ends
     * (the next reads go to the sink); only the record of these events is lost. */
    if (note(self, p, starts, sizes, count) < 0) {
        PyErr_Clear();
        RelayBase_clear(self);
    }
    return 1;
}

static PyObject *
RelayBase_data_received(RelayBase *self, PyObject *data)
{
    if (self->passing && self->edge && PyBytes_CheckExact(data)) {
        int r = pass_on(self, data);
        if (r == 1) Py_RETURN_NONE;
        if (r < 0) {
            /* The slow path meets the same failure and handles it (the sink's error). */
            PyErr_Clear();
            RelayBase_clear(self);
        }
    }
    return PyObject_CallMethodOneArg((PyObject *)self, str_slow, data);
}

static PyObject *
RelayBase_open(RelayBase *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "open_passthrough(write, seen, clock, writer, strip)");
        return NULL;
    }
    int strip = PyObject_IsTrue(args[4]);
    if (strip < 0) return NULL;
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    Py_INCREF(args[2]);
    Py_INCREF(args[3]);
    RelayBase_clear(self);
    self->write = args[0];
    self->seen = args[1];
    self->clock = args[2];
    self->writer = args[3];
    self->strip = (char)strip;
    self->passing = 1;
    Py_RETURN_NONE;
}

static PyObject *
RelayBase_close(RelayBase *self, PyObject *Py_UNUSED(ignored))
{
    RelayBase_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
RelayBase_get_passing(RelayBase *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->passing);
}

static PyMethodDef RelayBase_methods[] = {
    {"data_received", (PyCFunction)RelayBase_data_received, METH_O, NULL},
    {"open_passthrough", (PyCFunction)(void (*)(void))RelayBase_open, METH_FASTCALL, NULL},
    {"close_passthrough", (PyCFunction)RelayBase_close, METH_NOARGS, NULL},
    {NULL},
};

static PyMemberDef RelayBase_members[] = {
    {"_edge", T_BOOL, offsetof(RelayBase, edge), 0, NULL},
    {"_last_data", T_DOUBLE, offsetof(RelayBase, last_data), 0, NULL},
    {"passed", T_PYSSIZET, offsetof(RelayBase, passed), 0, NULL},
    {NULL},
};

static PyGetSetDef RelayBase_getset[] = {
    {"passing", (getter)RelayBase_get_passing, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject RelayBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "app.proxy._passthrough.RelayBase",
    .tp_basicsize = sizeof(RelayBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)RelayBase_dealloc,
    .tp_traverse = (traverseproc)RelayBase_traverse,
    .tp_clear = (inquiry)RelayBase_clear,
    .tp_methods = RelayBase_methods,
    .tp_members = RelayBase_members,
    .tp_getset = RelayBase_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "app.proxy._passthrough",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__passthrough(void)
{
    str_slow = PyUnicode_InternFromString("_slow_received");
    str_closed = PyUnicode_InternFromString("closed");
    if (str_slow == NULL || str_closed == NULL) return NULL;
    if (PyType_Ready(&RelayBaseType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RelayBaseType);
    if (PyModule_AddObject(m, "RelayBase", (PyObject *)&RelayBaseType) < 0) {
        Py_DECREF(&RelayBaseType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
