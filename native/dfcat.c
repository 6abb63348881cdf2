/* dfcat: print the first values of a datafabric variable, read from this machine's shared
 * memory under a lease.  `dfcat [-s HOST:PORT] [-n COUNT] NAME`; the address defaults to
 * $DATAFABRIC_HTTP, then 127.0.0.1:8787 (the scheduler's dashboard port). */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datafabric.h"

static void print_value(const char *element, const unsigned char *p, size_t size) {
    if (!strcmp(element, "bool")) printf("%s\n", *p ? "true" : "false");
    else if (!strcmp(element, "int8")) printf("%d\n", *(const int8_t *)p);
    else if (!strcmp(element, "uint8")) printf("%u\n", *p);
    else if (!strcmp(element, "int16")) { int16_t x; memcpy(&x, p, 2); printf("%d\n", x); }
    else if (!strcmp(element, "uint16")) { uint16_t x; memcpy(&x, p, 2); printf("%u\n", x); }
    else if (!strcmp(element, "int32")) { int32_t x; memcpy(&x, p, 4); printf("%" PRId32 "\n", x); }
    else if (!strcmp(element, "uint32")) { uint32_t x; memcpy(&x, p, 4); printf("%" PRIu32 "\n", x); }
    else if (!strcmp(element, "int64")) { int64_t x; memcpy(&x, p, 8); printf("%" PRId64 "\n", x); }
    else if (!strcmp(element, "uint64")) { uint64_t x; memcpy(&x, p, 8); printf("%" PRIu64 "\n", x); }
    else if (!strcmp(element, "float32")) { float x; memcpy(&x, p, 4); printf("%.9g\n", x); }
    else if (!strcmp(element, "float64")) { double x; memcpy(&x, p, 8); printf("%.17g\n", x); }
    else if (!strcmp(element, "complex64")) { float x[2]; memcpy(x, p, 8); printf("%.9g %.9g\n", x[0], x[1]); }
    else if (!strcmp(element, "complex128")) { double x[2]; memcpy(x, p, 16); printf("%.17g %.17g\n", x[0], x[1]); }
    else {
        for (size_t i = 0; i < size; i++) printf("%02x", p[i]);
        printf("\n");
    }
}

int main(int argc, char **argv) {
    const char *address = getenv("DATAFABRIC_HTTP");
    long count = 10;
    int opt;
    while ((opt = getopt(argc, argv, "s:n:h")) != -1) {
        if (opt == 's') address = optarg;
        else if (opt == 'n') count = strtol(optarg, NULL, 10);
        else {
            fprintf(stderr, "usage: dfcat [-s HOST:PORT] [-n COUNT] NAME\n");
            return opt == 'h' ? 0 : 2;
        }
    }
    if (optind != argc - 1 || count < 0) {
        fprintf(stderr, "usage: dfcat [-s HOST:PORT] [-n COUNT] NAME\n");
        return 2;
    }
    char host[256] = "127.0.0.1";
    int port = 8787;
    if (address && *address) {
        const char *colon = strrchr(address, ':');
        if (!colon || sscanf(colon + 1, "%d", &port) != 1 || (size_t)(colon - address) >= sizeof host) {
            fprintf(stderr, "dfcat: give the scheduler's HTTP address as HOST:PORT, not %s\n", address);
            return 2;
        }
        memcpy(host, address, colon - address);
        host[colon - address] = 0;
    }
    const char *name = argv[optind];
    df_var v;
    char err[DF_ERR_LEN];
    if (df_open(host, port, name, 30.0, &v, err, sizeof err) != 0) {
        fprintf(stderr, "dfcat: %s: %s\n", name, err);
        return 1;
    }
    uint64_t items = 1;
    for (int i = 0; i < v.ndim; i++) items *= (uint64_t)v.shape[i];
    size_t size = items ? v.nbytes / items : 0;
    size_t known = df_element_size(v.element);
    if (known && known != size) {
        fprintf(stderr, "dfcat: %s: type %s does not match its %" PRIu64 " bytes\n", name, v.type, v.nbytes);
        df_close(&v);
        return 1;
    }
    printf("# %s: %s (node %s)\n", v.name, v.type, v.node);
    const unsigned char *data = v.data;
    for (uint64_t i = 0; i < items && i < (uint64_t)count; i++) {
        if (!df_lease_valid(&v, 1.0)) {  /* the memory may be another variable's from now on */
            fprintf(stderr, "dfcat: %s: the lease lapsed while reading\n", name);
            df_close(&v);
            return 1;
        }
        print_value(v.element, data + i * size, size);
    }
    df_close(&v);
    return 0;
}
