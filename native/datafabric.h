/* datafabric.h: read a datafabric variable from C, with no Python and no Dask.
 *
 * The reader asks the scheduler's HTTP API for a lease (POST /fabric/api/v1/lease/NAME),
 * which returns where the variable's copies are; it maps a copy's block read-only
 * (shm_open + mmap), checks the block and extent headers (docs/layout.md), and reads the
 * type string, the shape and the data offset from the extent itself.  df_close unmaps the
 * block and releases the lease (DELETE /fabric/api/v1/lease/ID).
 *
 * THE LEASE IS WHAT KEEPS THE MEMORY YOURS.  While it is held, the bytes at `data` are the
 * variable's, unchanged: nothing moves, frees or reuses them, even if the name is deleted.
 * A lease lapses at `expires` (seconds since the epoch) unless renewed with df_renew.  After
 * it lapses (or after df_close) the memory may be freed and reused by another variable AT
 * ONCE, and the mapping then shows other bytes: do not read `data` after that.  Check
 * df_lease_valid() before each read of a long-running reader, and renew well before expiry:
 * `expires` is the scheduler's clock, so leave a margin for clocks that differ.
 *
 * Only this machine's copies can be mapped: a variable stored only on other machines is
 * refused (read it with GET /fabric/api/v1/data/NAME instead).  Plain HTTP only: for a
 * scheduler whose dashboard uses TLS, use an HTTP client with TLS.
 */
#ifndef DATAFABRIC_H
#define DATAFABRIC_H

#include <stddef.h>
#include <stdint.h>

#define DF_MAX_DIMS 32
#define DF_ERR_LEN 512

typedef struct df_var {
    char name[1024];     /* the variable's name (UTF-8), as its extent header stores it */
    char type[1024];     /* the canonical datashape, e.g. "40 * 20 * float64" */
    char element[256];   /* the element part of the type, e.g. "float64" */
    char dtype[64];      /* numpy's spelling, e.g. "<f8" (records: a list of fields) */
    int ndim;
    int64_t shape[DF_MAX_DIMS];
    uint64_t nbytes;
    const void *data;    /* read-only; valid only while the lease is (see above) */
    double expires;      /* when the lease lapses, seconds since the epoch */
    char node[256];      /* the node of the mapped copy */
    /* private */
    char lease[64];
    char host[256];
    int port;
    void *map;
    size_t map_size;
} df_var;

/* Take a lease on NAME for ttl seconds from the scheduler's HTTP server at host:port,
 * map a copy on this machine and check it.  0 on success; otherwise -1 and a message in
 * err (which says what was wrong and what to do), with nothing held. */
int df_open(const char *host, int port, const char *name, double ttl, df_var *var, char *err, size_t errlen);

/* Renew the lease for ttl more seconds.  0, or -1 with a message (a lapsed lease cannot be
 * renewed: the memory may be gone; close and open again). */
int df_renew(df_var *var, double ttl, char *err, size_t errlen);

/* 1 while the lease has more than `margin` seconds left; 0 once reading is unsafe. */
int df_lease_valid(const df_var *var, double margin);

/* Unmap the block and release the lease; the struct may be reused after. */
void df_close(df_var *var);

/* The size in bytes of one element of a plain numeric element type ("int32", "float64",
 * "bool", "complex128", ...), or 0 for others (records, strings). */
size_t df_element_size(const char *element);

#endif
