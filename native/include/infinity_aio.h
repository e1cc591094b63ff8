/* infinity_aio.h: the whole C ABI of infinity's async-IO engine.
 *
 * Plain C types only; no Python, no torch.  Every function that can fail
 * returns 0 (or a non-negative count) on success and -errno on failure.
 * No callbacks: a caller submits a request, then polls or waits for it.
 *
 * A request (buffer, byte count, file, file offset) is split into
 * block_size pieces.  The pieces of the O_DIRECT body go to thread_count
 * worker threads in contiguous runs; each worker owns one libaio context
 * and keeps up to queue_depth pieces in flight.  A tail that is not a
 * multiple of the direct alignment goes through the buffered descriptor.
 */
#ifndef INFINITY_AIO_H
#define INFINITY_AIO_H

#include <stddef.h>
#include <stdint.h>

#define INF_AIO_ABI_VERSION 2

#define INF_AIO_OP_READ 0
#define INF_AIO_OP_WRITE 1

typedef struct inf_aio_params {
    uint64_t block_size;    /* bytes per piece, > 0 */
    int32_t queue_depth;    /* pieces in flight per worker, >= 1 */
    int32_t thread_count;   /* worker threads, each with its own io context, >= 1 */
    int32_t single_submit;  /* 1: io_submit one iocb per call; 0: batches */
    int32_t overlap_events; /* 1: refill as pieces complete; 0: wait for a whole batch */
} inf_aio_params;

/* What one request did.  status is 0 or -errno of the first failing piece.
 * A short transfer has status -EIO and short_transfer 1, and names the piece
 * (offset, expected and actual bytes). */
typedef struct inf_aio_result {
    int64_t status;
    int32_t short_transfer;
    int32_t failed_pieces;
    uint64_t bytes_requested;
    uint64_t bytes_done;
    int64_t fail_offset;      /* file offset of the first failing piece, -1 if none */
    uint64_t fail_expected;
    uint64_t fail_actual;
    uint64_t direct_bytes;    /* bytes moved through the O_DIRECT descriptor */
    uint64_t complete_ns;     /* CLOCK_MONOTONIC when the last piece completed (for latency metrics) */
} inf_aio_result;

typedef struct inf_aio_handle inf_aio_handle;
typedef struct inf_aio_request inf_aio_request;

int inf_aio_abi_version(void);

/* Creates the worker threads and their io contexts.  -EAGAIN from io_setup
 * means /proc/sys/fs/aio-max-nr is too small for thread_count * queue_depth. */
int inf_aio_create(const inf_aio_params *params, inf_aio_handle **out);

/* Waits for every request still in flight, stops the workers, frees the handle. */
void inf_aio_destroy(inf_aio_handle *handle);

/* Queues one request and returns at once.
 * direct_fd: descriptor opened with O_DIRECT, or -1 to use buffered_fd for all.
 * direct_align: alignment O_DIRECT needs (logical block size), a power of two.
 * The buffer must stay valid until inf_aio_wait has returned for the request.
 * Request pieces go through direct_fd only when buf and offset are aligned. */
int inf_aio_submit(inf_aio_handle *handle, int32_t op, int32_t direct_fd, int32_t buffered_fd,
                   uint64_t direct_align, void *buf, uint64_t nbytes, int64_t offset,
                   inf_aio_request **out);

/* 1 when every piece of the request has completed, else 0.  Never blocks. */
int inf_aio_done(inf_aio_request *request);

/* Blocks until the request completes and fills *result.  Returns result->status. */
int64_t inf_aio_wait(inf_aio_request *request, inf_aio_result *result);

/* Frees a request; waits for it first if it is still in flight. */
void inf_aio_release(inf_aio_request *request);

/* Pieces in flight in the kernel across all workers of the handle, now.  A piece leaves the count
 * before its request is marked done: after every request has been waited for, this reads 0. */
int64_t inf_aio_inflight(inf_aio_handle *handle);

#endif
