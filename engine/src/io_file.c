/* io_file.c -- mmap, atomic write (path.tmp + rename) and host staging for file I/O. */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* MAP_NORESERVE */
#include "io_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const moe_device cpu_dev = {MOE_DEVICE_CPU, 0};

static void unmap_release(moe_storage *s) {
    /* ctx holds the mapped length (s->bytes is the same; kept for clarity) */
    munmap(s->data, (size_t)(uintptr_t)s->ctx);
}

moe_status moe__mem_copy_storage(const char *fn, const void *data, size_t size,
                                 moe_storage **out) {
    moe_storage *s = NULL;
    moe_status st = moe__storage_new(&s, size, cpu_dev);
    if (st != MOE_OK) return moe__err(st, "%s: out of host memory for %zu bytes", fn, size);
    if (size) memcpy(s->data, data, size);
    *out = s;
    return MOE_OK;
}

moe_status moe__file_map(const char *fn, const char *path, moe_storage **out, size_t *size) {
    *out = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moe__err(MOE_ERR_IO, "%s: %s: %s", fn, path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return moe__err(MOE_ERR_IO, "%s: %s: %s", fn, path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return moe__err(MOE_ERR_IO, "%s: %s: not a regular file", fn, path);
    }
    if ((uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
        close(fd);
        return moe__err(MOE_ERR_IO, "%s: %s: file too large for this address space", fn, path);
    }
    size_t n = (size_t)sb.st_size;
    moe_status st;
    if (n > 0) {
        /* private + writable so that writes into a loaded tensor go to private pages instead
         * of faulting; MAP_NORESERVE keeps a file larger than RAM + swap mappable under the
         * default overcommit heuristic (only the pages actually written need memory) */
        int flags = MAP_PRIVATE;
#ifdef MAP_NORESERVE
        flags |= MAP_NORESERVE;
#endif
        void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, flags, fd, 0);
        if (p != MAP_FAILED) {
            close(fd);
            st = moe__storage_wrap(out, p, n, cpu_dev, unmap_release, (void *)(uintptr_t)n, 1);
            if (st != MOE_OK) {
                munmap(p, n);
                return st;
            }
            *size = n;
            return MOE_OK;
        }
    }
    /* empty file, or mmap refused (special file system): read it instead */
    moe_storage *s = NULL;
    st = moe__storage_new(&s, n, cpu_dev);
    if (st != MOE_OK) {
        close(fd);
        return moe__err(st, "%s: %s: out of host memory for %zu bytes", fn, path, n);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)s->data + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int e = r < 0 ? errno : EIO;
            close(fd);
            moe__storage_release(s);
            return moe__err(MOE_ERR_IO, "%s: %s: read failed: %s", fn, path, strerror(e));
        }
        got += (size_t)r;
    }
    close(fd);
    *out = s;
    *size = n;
    return MOE_OK;
}

/* ---------------------------------------------------------------- writer -- */

moe_status moe__wfile_open(moe_wfile *w, const char *fn, const char *path) {
    memset(w, 0, sizeof *w);
    w->fn = fn;
    w->path = path;
    size_t len = strlen(path);
    w->tmp = (char *)malloc(len + 5);
    if (!w->tmp) return moe__err(MOE_ERR_NOMEM, "%s: out of host memory", fn);
    memcpy(w->tmp, path, len);
    memcpy(w->tmp + len, ".tmp", 5);
    w->f = fopen(w->tmp, "wb");
    if (!w->f) {
        int e = errno;
        free(w->tmp);
        w->tmp = NULL;
        return moe__err(MOE_ERR_IO, "%s: %s: cannot create: %s", fn, path, strerror(e));
    }
    return MOE_OK;
}

moe_status moe__wfile_write(moe_wfile *w, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, w->f) != n)
        return moe__err(MOE_ERR_IO, "%s: %s: write failed: %s", w->fn, w->path, strerror(errno));
    return MOE_OK;
}

void moe__wfile_abort(moe_wfile *w) {
    if (w->f) fclose(w->f);
    w->f = NULL;
    if (w->tmp) {
        remove(w->tmp);
        free(w->tmp);
    }
    w->tmp = NULL;
}

moe_status moe__wfile_commit(moe_wfile *w) {
    int e = 0;
    if (fflush(w->f) != 0) e = errno;
    if (!e && fsync(fileno(w->f)) != 0 && errno != EINVAL && errno != EROFS) e = errno;
    if (fclose(w->f) != 0 && !e) e = errno;
    w->f = NULL;
    if (e) {
        moe__wfile_abort(w);
        return moe__err(MOE_ERR_IO, "%s: %s: write failed: %s", w->fn, w->path, strerror(e));
    }
    if (rename(w->tmp, w->path) != 0) {
        e = errno;
        moe__wfile_abort(w);
        return moe__err(MOE_ERR_IO, "%s: %s: rename from .tmp failed: %s", w->fn, w->path,
                        strerror(e));
    }
    free(w->tmp);
    w->tmp = NULL;
    return MOE_OK;
}

moe_status moe__err_prefix(moe_status st, const char *fn, const char *name) {
    char old[512];
    snprintf(old, sizeof old, "%s", moe_last_error());
    return moe__err(st, "%s: %s: %s", fn, name, old);
}

/* ---------------------------------------------------------------- staging -- */

moe_status moe__host_bytes(const moe_tensor *t, moe_tensor **tmp, const void **data,
                           size_t *nbytes) {
    *tmp = NULL;
    const moe_tensor *src = t;
    moe_device dev = moe_tensor_device(t);
    if (dev.type != MOE_DEVICE_CPU) {
        MOE_TRY(moe_tensor_to_device(tmp, t, cpu_dev));
        src = *tmp;
    } else if (!moe_tensor_is_contiguous(t)) {
        MOE_TRY(moe_tensor_contiguous(tmp, t));
        src = *tmp;
    }
    *data = moe_tensor_data(src);
    *nbytes = moe_tensor_nbytes(src);
    return MOE_OK;
}
