/* aio.c: infinity's async-IO engine on libaio.
 *
 * One handle owns thread_count workers.  Each worker owns one libaio context,
 * a FIFO of work items (contiguous runs of a request) and queue_depth piece
 * slots.  A request is split into block_size pieces; the pieces of each
 * segment are dealt to the workers in contiguous runs, so every worker reads
 * or writes one sequential stretch of the file.  Completions are counted per
 * request; the last piece wakes whoever waits on it.
 *
 * [Note: why the tail goes through a second descriptor]
 * O_DIRECT needs the buffer address, the file offset and the length to be
 * multiples of the logical block size.  The aligned body of a request goes
 * through the O_DIRECT descriptor; the rest (a tail shorter than one block,
 * or a whole request whose buffer or offset is unaligned) goes through the
 * buffered descriptor of the same file.  The kernel flushes and invalidates
 * cached pages in the range of a direct transfer, so the two stay coherent
 * for the non-overlapping ranges that one request touches.
 */
#define _GNU_SOURCE
#include "infinity_aio.h"

#include <errno.h>
#include <libaio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct work_item {
    struct work_item *next;
    inf_aio_request *req;
    int32_t op;
    int32_t fd;
    int32_t direct;
    char *buf;
    int64_t offset;
    uint64_t nbytes;
    uint64_t issued; /* bytes of this run already turned into pieces */
} work_item;

typedef struct piece {
    struct iocb cb;
    inf_aio_request *req;
    uint64_t expected;
    int64_t offset;
    int32_t direct;
} piece;

typedef struct worker {
    inf_aio_handle *handle;
    pthread_t thread;
    int started;
    io_context_t ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    work_item *head, *tail;
    int stop;
    piece *slots;
    piece **free_slots;
    int nfree;
    struct iocb **batch;
    struct io_event *events;
    int inflight; /* owned by the worker thread */
} worker;

struct inf_aio_handle {
    inf_aio_params params;
    worker *workers;
    int64_t inflight; /* atomic: pieces in the kernel, all workers */
};

struct inf_aio_request {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int64_t pieces_left;
    int done;
    inf_aio_result result;
};

int inf_aio_abi_version(void) { return INF_AIO_ABI_VERSION; }

/* ---- completion ------------------------------------------------------- */

/* The clock Python's time.monotonic_ns() reads, so a request's latency is complete_ns minus the
 * submitter's own reading (one vDSO call per request, taken only when its last piece completes). */
static uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void finish_piece(piece *p, int64_t res) {
    inf_aio_request *req = p->req;
    inf_aio_result *r = &req->result;
    pthread_mutex_lock(&req->mu);
    if (res < 0 || (uint64_t)res < p->expected) {
        r->failed_pieces++;
        if (r->status == 0) {
            r->status = res < 0 ? res : -EIO;
            r->short_transfer = res >= 0;
            r->fail_offset = p->offset;
            r->fail_expected = p->expected;
            r->fail_actual = res < 0 ? 0 : (uint64_t)res;
        }
    }
    if (res > 0) {
        r->bytes_done += (uint64_t)res;
        if (p->direct) r->direct_bytes += (uint64_t)res;
    }
    if (--req->pieces_left == 0) {
        r->complete_ns = monotonic_ns();
        req->done = 1;
        pthread_cond_broadcast(&req->cv);
    }
    pthread_mutex_unlock(&req->mu);
}

/* ---- worker ------------------------------------------------------------ */

/* Turns queued work into iocbs while free slots remain.  Called with w->mu held. */
static int fill_batch(worker *w) {
    uint64_t bs = w->handle->params.block_size;
    int n = 0;
    while (w->nfree > 0 && w->head) {
        work_item *it = w->head;
        uint64_t len = it->nbytes - it->issued;
        if (len > bs) len = bs;
        piece *p = w->free_slots[--w->nfree];
        p->req = it->req;
        p->expected = len;
        p->offset = it->offset + (int64_t)it->issued;
        p->direct = it->direct;
        if (it->op == INF_AIO_OP_READ)
            io_prep_pread(&p->cb, it->fd, it->buf + it->issued, len, p->offset);
        else
            io_prep_pwrite(&p->cb, it->fd, it->buf + it->issued, len, p->offset);
        p->cb.data = p;
        w->batch[n++] = &p->cb;
        it->issued += len;
        if (it->issued == it->nbytes) {
            w->head = it->next;
            if (!w->head) w->tail = NULL;
            free(it);
        }
    }
    return n;
}

static void release_slot(worker *w, piece *p) {
    pthread_mutex_lock(&w->mu);
    w->free_slots[w->nfree++] = p;
    pthread_mutex_unlock(&w->mu);
}

/* A piece the kernel refused at submission completes at once with that error. */
static void refuse_piece(worker *w, struct iocb *cb, int err) {
    piece *p = (piece *)cb->data;
    finish_piece(p, err);
    release_slot(w, p);
}

static void submit_batch(worker *w, int n) {
    int single = w->handle->params.single_submit;
    int off = 0;
    while (off < n) {
        int want = single ? 1 : n - off;
        int r = io_submit(w->ctx, want, w->batch + off);
        if (r == -EINTR) continue;
        if (r <= 0) { /* the first iocb of the call was refused */
            refuse_piece(w, w->batch[off], r == 0 ? -EAGAIN : r);
            off++;
            continue;
        }
        off += r;
        w->inflight += r;
        __atomic_add_fetch(&w->handle->inflight, r, __ATOMIC_RELAXED);
    }
}

static void reap(worker *w) {
    int min_nr = w->handle->params.overlap_events ? 1 : w->inflight;
    int got = io_getevents(w->ctx, min_nr, w->handle->params.queue_depth, w->events, NULL);
    if (got < 0) return; /* -EINTR: the loop comes back here */
    /* [Note: in flight before done] The reaped pieces leave the kernel's count before any of them
     * completes its request: a waiter woken by finish_piece may read inf_aio_inflight at once, and
     * must not see its own request still counted. */
    w->inflight -= got;
    __atomic_sub_fetch(&w->handle->inflight, got, __ATOMIC_RELAXED); /* req->mu orders it before the wake */
    for (int i = 0; i < got; i++) {
        piece *p = (piece *)w->events[i].data;
        /* res holds the byte count or -errno; res2 is never set for files. */
        finish_piece(p, (int64_t)(long)w->events[i].res);
        release_slot(w, p);
    }
}

static void *worker_main(void *arg) {
    worker *w = (worker *)arg;
    int overlap = w->handle->params.overlap_events;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (!w->head && w->inflight == 0 && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
        if (!w->head && w->inflight == 0) { /* stop requested and drained */
            pthread_mutex_unlock(&w->mu);
            break;
        }
        /* Without overlap_events a new batch starts only when the last one is done. */
        int n = (overlap || w->inflight == 0) ? fill_batch(w) : 0;
        pthread_mutex_unlock(&w->mu);
        if (n > 0) submit_batch(w, n);
        if (w->inflight > 0) reap(w);
    }
    return NULL;
}

/* ---- handle ------------------------------------------------------------ */

static void worker_free(worker *w) {
    if (w->ctx) io_destroy(w->ctx);
    free(w->slots);
    free(w->free_slots);
    free(w->batch);
    free(w->events);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
}

static int worker_init(inf_aio_handle *h, worker *w) {
    int qd = h->params.queue_depth;
    w->handle = h;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->slots = calloc((size_t)qd, sizeof(piece));
    w->free_slots = calloc((size_t)qd, sizeof(piece *));
    w->batch = calloc((size_t)qd, sizeof(struct iocb *));
    w->events = calloc((size_t)qd, sizeof(struct io_event));
    if (!w->slots || !w->free_slots || !w->batch || !w->events) return -ENOMEM;
    for (int i = 0; i < qd; i++) w->free_slots[i] = &w->slots[i];
    w->nfree = qd;
    int r = io_setup(qd, &w->ctx); /* libaio returns -errno */
    if (r < 0) {
        w->ctx = 0;
        return r;
    }
    r = pthread_create(&w->thread, NULL, worker_main, w);
    if (r != 0) return -r;
    w->started = 1;
    return 0;
}

int inf_aio_create(const inf_aio_params *params, inf_aio_handle **out) {
    if (!params || !out) return -EINVAL;
    if (params->block_size == 0 || params->queue_depth < 1 || params->thread_count < 1) return -EINVAL;
    inf_aio_handle *h = calloc(1, sizeof(*h));
    if (!h) return -ENOMEM;
    h->params = *params;
    h->workers = calloc((size_t)params->thread_count, sizeof(worker));
    if (!h->workers) {
        free(h);
        return -ENOMEM;
    }
    for (int t = 0; t < params->thread_count; t++) {
        int r = worker_init(h, &h->workers[t]);
        if (r < 0) {
            h->params.thread_count = t + 1; /* destroy what was built, this one included */
            inf_aio_destroy(h);
            return r;
        }
    }
    *out = h;
    return 0;
}

void inf_aio_destroy(inf_aio_handle *h) {
    if (!h) return;
    for (int t = 0; t < h->params.thread_count; t++) {
        worker *w = &h->workers[t];
        if (w->started) {
            pthread_mutex_lock(&w->mu);
            w->stop = 1;
            pthread_cond_signal(&w->cv);
            pthread_mutex_unlock(&w->mu);
            pthread_join(w->thread, NULL);
        }
        if (w->handle) worker_free(w);
    }
    free(h->workers);
    free(h);
}

int64_t inf_aio_inflight(inf_aio_handle *h) {
    return h ? __atomic_load_n(&h->inflight, __ATOMIC_RELAXED) : 0;
}

/* ---- requests ---------------------------------------------------------- */

static uint64_t pieces_of(uint64_t nbytes, uint64_t bs) { return (nbytes + bs - 1) / bs; }

/* Cuts one segment into contiguous runs of pieces, one run per worker, into items[]. */
static int plan_segment(inf_aio_handle *h, inf_aio_request *req, int32_t op, int32_t fd, int32_t direct,
                        char *buf, int64_t offset, uint64_t nbytes, work_item **items, int *count) {
    uint64_t bs = h->params.block_size;
    uint64_t n = pieces_of(nbytes, bs);
    uint64_t threads = (uint64_t)h->params.thread_count;
    for (uint64_t t = 0; t < threads; t++) {
        uint64_t first = t * n / threads, last = (t + 1) * n / threads;
        if (first == last) continue;
        uint64_t begin = first * bs, end = last * bs < nbytes ? last * bs : nbytes;
        work_item *it = calloc(1, sizeof(*it));
        if (!it) return -ENOMEM;
        *it = (work_item){NULL, req, op, fd, direct, buf + begin, offset + (int64_t)begin, end - begin, 0};
        items[t * 2 + (direct ? 0 : 1)] = it;
        (*count)++;
    }
    return 0;
}

static void enqueue(inf_aio_handle *h, int t, work_item *it) {
    worker *w = &h->workers[t];
    pthread_mutex_lock(&w->mu);
    if (w->tail) w->tail->next = it;
    else w->head = it;
    w->tail = it;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void request_free(inf_aio_request *req) {
    pthread_mutex_destroy(&req->mu);
    pthread_cond_destroy(&req->cv);
    free(req);
}

int inf_aio_submit(inf_aio_handle *h, int32_t op, int32_t direct_fd, int32_t buffered_fd,
                   uint64_t direct_align, void *buf, uint64_t nbytes, int64_t offset,
                   inf_aio_request **out) {
    if (!h || !out || offset < 0 || (op != INF_AIO_OP_READ && op != INF_AIO_OP_WRITE)) return -EINVAL;
    if (nbytes > 0 && !buf) return -EFAULT;
    if (buffered_fd < 0 && direct_fd < 0) return -EBADF;
    if (direct_align & (direct_align - 1)) return -EINVAL;
    uint64_t body = 0;
    if (direct_fd >= 0 && direct_align > 0 && ((uintptr_t)buf % direct_align) == 0 &&
        ((uint64_t)offset % direct_align) == 0)
        body = nbytes - nbytes % direct_align;
    uint64_t rest = nbytes - body;
    if (rest > 0 && buffered_fd < 0) return -EINVAL; /* the unaligned part needs a buffered fd */

    inf_aio_request *req = calloc(1, sizeof(*req));
    int threads = h->params.thread_count;
    work_item **items = calloc((size_t)threads * 2, sizeof(work_item *));
    if (!req || !items) {
        free(req);
        free(items);
        return -ENOMEM;
    }
    pthread_mutex_init(&req->mu, NULL);
    pthread_cond_init(&req->cv, NULL);
    req->result.bytes_requested = nbytes;
    req->result.fail_offset = -1;
    uint64_t bs = h->params.block_size;
    req->pieces_left = (int64_t)(pieces_of(body, bs) + pieces_of(rest, bs));
    req->done = req->pieces_left == 0;
    if (req->done) req->result.complete_ns = monotonic_ns();
    /* Every item is allocated before any is queued: a failure leaves nothing in flight. */
    int count = 0, r = 0;
    if (body > 0) r = plan_segment(h, req, op, direct_fd, 1, (char *)buf, offset, body, items, &count);
    if (r == 0 && rest > 0)
        r = plan_segment(h, req, op, buffered_fd, 0, (char *)buf + body, offset + (int64_t)body, rest,
                         items, &count);
    if (r < 0) {
        for (int i = 0; i < threads * 2; i++) free(items[i]);
        free(items);
        request_free(req);
        return r;
    }
    for (int i = 0; i < threads * 2; i++)
        if (items[i]) enqueue(h, i / 2, items[i]);
    free(items);
    *out = req;
    return 0;
}

int inf_aio_done(inf_aio_request *req) {
    pthread_mutex_lock(&req->mu);
    int d = req->done;
    pthread_mutex_unlock(&req->mu);
    return d;
}

int64_t inf_aio_wait(inf_aio_request *req, inf_aio_result *result) {
    pthread_mutex_lock(&req->mu);
    while (!req->done) pthread_cond_wait(&req->cv, &req->mu);
    if (result) *result = req->result;
    int64_t status = req->result.status;
    pthread_mutex_unlock(&req->mu);
    return status;
}

void inf_aio_release(inf_aio_request *req) {
    if (!req) return;
    inf_aio_wait(req, NULL);
    request_free(req);
}
