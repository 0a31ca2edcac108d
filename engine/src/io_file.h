/* io_file.h -- file helpers shared by the .npy and safetensors readers/writers. */
#ifndef MOE_IO_FILE_H
#define MOE_IO_FILE_H

#include "internal.h"

#include <stdio.h>

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "moelab's file I/O assumes a little-endian host"
#endif

/* Map the whole regular file `path` into a host storage (*out, one reference, accounted as
 * host bytes; released by munmap).  The mapping is private and copy-on-write: writing into
 * tensors that view it never changes the file.  Falls back to reading the file into memory
 * when mmap is not possible.  *size is the file size (the storage has >= 1 byte even for an
 * empty file).  Errors: MOE_ERR_IO "<fn>: <path>: <strerror>". */
moe_status moe__file_map(const char *fn, const char *path, moe_storage **out, size_t *size);

/* A host storage holding a copy of data[0..size). */
moe_status moe__mem_copy_storage(const char *fn, const void *data, size_t size,
                                 moe_storage **out);

/* Writer that goes to "<path>.tmp" and is renamed over path on commit. */
typedef struct moe_wfile {
    FILE *f;
    char *tmp;
    const char *path;
    const char *fn;
} moe_wfile;

moe_status moe__wfile_open(moe_wfile *w, const char *fn, const char *path);
moe_status moe__wfile_write(moe_wfile *w, const void *p, size_t n);
/* Flush, fsync, close and rename; on failure the temporary file is removed. */
moe_status moe__wfile_commit(moe_wfile *w);
/* Close and remove the temporary file (safe to call after a failed open/commit). */
void moe__wfile_abort(moe_wfile *w);

/* Re-raise the thread's last error with "<fn>: <name>: " in front (copies the old message
 * first: moe__err must not read the buffer it writes). */
moe_status moe__err_prefix(moe_status st, const char *fn, const char *name);

/* Contiguous host bytes of t.  When t is not already a contiguous host tensor a copy is made
 * into *tmp (free it with moe_tensor_free; NULL otherwise). */
moe_status moe__host_bytes(const moe_tensor *t, moe_tensor **tmp, const void **data,
                           size_t *nbytes);

#endif
