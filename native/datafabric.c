/* datafabric.c: the C reader of datafabric.h.  HTTP/1.1 over a plain socket, a minimal
 * reader of the JSON the API writes, and the header checks of docs/layout.md. */
#define _POSIX_C_SOURCE 200809L
#include "datafabric.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the datafabric layout is little endian, and so must this machine be"
#endif

#define LAYOUT_VERSION 3
#define BLOCK_HEADER_SIZE 512
#define BLOCK_FIXED 58
#define EXTENT_FIXED 48
#define STATE_SEALED 2
#define STATE_DELETED 3
#define MAX_RESPONSE (4 << 20)

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (err && errlen) vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static double now(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return tv.tv_sec + tv.tv_usec / 1e6;
}

/* ---- HTTP ------------------------------------------------------------------------- */

/* The body of the answer to METHOD PATH (malloc'ed, NUL-terminated), its status in *status. */
static char *http(const char *host, int port, const char *method, const char *path, int *status, char *err,
                  size_t errlen) {
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0) {
        fail(err, errlen, "cannot resolve %s: %s", host, gai_strerror(rc));
        return NULL;
    }
    int fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        fail(err, errlen, "cannot connect to the scheduler's HTTP server at %s:%d (%s); is a fabric running there?",
             host, port, strerror(errno));
        return NULL;
    }
    char req[4096];
    int n = snprintf(req, sizeof req,
                     "%s %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", method,
                     path, host, port);
    if (n < 0 || (size_t)n >= sizeof req) {
        close(fd);
        fail(err, errlen, "request too long");
        return NULL;
    }
    for (int sent = 0; sent < n;) {
        ssize_t k = send(fd, req + sent, n - sent, 0);
        if (k <= 0) {
            close(fd);
            fail(err, errlen, "sending to %s:%d failed: %s", host, port, strerror(errno));
            return NULL;
        }
        sent += k;
    }
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (len == cap) {
            if (cap >= MAX_RESPONSE) break;
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
        ssize_t k = recv(fd, buf + len, cap - len, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        len += k;
    }
    close(fd);
    buf[len] = 0;
    char *body = strstr(buf, "\r\n\r\n");
    if (strncmp(buf, "HTTP/1.", 7) != 0 || !body || sscanf(buf + 8, " %d", status) != 1) {
        free(buf);
        fail(err, errlen, "%s:%d did not answer as an HTTP server does", host, port);
        return NULL;
    }
    memmove(buf, body + 4, len - (body + 4 - buf) + 1);
    return buf;
}

/* Percent-encode a name for a path; '/' stays (names are hierarchical). */
static void url_encode(const char *s, char *out, size_t outlen) {
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p && o + 4 < outlen; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || strchr("-_.~/", *p)) {
            out[o++] = *p;
        } else {
            out[o++] = '%';
            out[o++] = hex[*p >> 4];
            out[o++] = hex[*p & 15];
        }
    }
    out[o] = 0;
}

/* ---- JSON (the API's own output: objects, arrays, strings, numbers, null) ---------- */

/* The end of the JSON string starting at the quote at p (the position after it). */
static const char *skip_string(const char *p) {
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && p[1]) p++;
    return *p ? p + 1 : p;
}

/* The end of the object or array starting at p, strings skipped. */
static const char *skip_nested(const char *p) {
    int depth = 0;
    for (; *p; p++) {
        if (*p == '"') {
            p = skip_string(p) - 1;
        } else if (*p == '{' || *p == '[') {
            depth++;
        } else if ((*p == '}' || *p == ']') && --depth == 0) {
            return p + 1;
        }
    }
    return p;
}

/* The value of KEY among the members of the object [start, end): only its own members,
 * never those of nested objects or keys that appear inside strings. */
static const char *json_member(const char *start, const char *end, const char *key) {
    size_t klen = strlen(key);
    const char *p = start + 1;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == ',' || *p == '\n')) p++;
        if (p >= end || *p != '"') return NULL;
        const char *kend = skip_string(p);
        int match = (size_t)(kend - p - 2) == klen && strncmp(p + 1, key, klen) == 0;
        p = kend;
        while (p < end && (*p == ' ' || *p == ':')) p++;
        if (match) return p;
        if (*p == '"') p = skip_string(p);
        else if (*p == '{' || *p == '[') p = skip_nested(p);
        else while (p < end && *p != ',' && *p != '}') p++;
    }
    return NULL;
}

static void put_utf8(char **o, char *end, unsigned cp) {
    char tmp[4];
    int n;
    if (cp < 0x80) { tmp[0] = cp; n = 1; }
    else if (cp < 0x800) { tmp[0] = 0xC0 | (cp >> 6); tmp[1] = 0x80 | (cp & 63); n = 2; }
    else if (cp < 0x10000) { tmp[0] = 0xE0 | (cp >> 12); tmp[1] = 0x80 | ((cp >> 6) & 63); tmp[2] = 0x80 | (cp & 63); n = 3; }
    else { tmp[0] = 0xF0 | (cp >> 18); tmp[1] = 0x80 | ((cp >> 12) & 63); tmp[2] = 0x80 | ((cp >> 6) & 63); tmp[3] = 0x80 | (cp & 63); n = 4; }
    for (int i = 0; i < n && *o < end; i++) *(*o)++ = tmp[i];
}

/* Decode the JSON string at p into out (UTF-8); 0, or -1 if it is no string or too long. */
static int json_string(const char *p, char *out, size_t outlen) {
    if (!p || *p != '"') return -1;
    char *o = out, *end = out + outlen - 1;
    for (p++; *p && *p != '"'; p++) {
        if (o >= end) return -1;
        if (*p != '\\') { *o++ = *p; continue; }
        p++;
        switch (*p) {
            case 'n': *o++ = '\n'; break;
            case 't': *o++ = '\t'; break;
            case 'r': *o++ = '\r'; break;
            case 'b': *o++ = '\b'; break;
            case 'f': *o++ = '\f'; break;
            case 'u': {
                unsigned cp = 0;
                if (sscanf(p + 1, "%4x", &cp) != 1) return -1;
                p += 4;
                if (cp >= 0xD800 && cp < 0xDC00 && p[1] == '\\' && p[2] == 'u') {
                    unsigned lo = 0;
                    if (sscanf(p + 3, "%4x", &lo) != 1) return -1;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                }
                put_utf8(&o, end, cp);
                break;
            }
            default: *o++ = *p;
        }
    }
    *o = 0;
    return *p == '"' ? 0 : -1;
}

static int json_u64(const char *p, uint64_t *out) {
    if (!p) return -1;
    char *e;
    errno = 0;
    unsigned long long v = strtoull(p, &e, 10);
    if (e == p || errno) return -1;
    *out = v;
    return 0;
}

/* ---- the layout ------------------------------------------------------------------- */

static uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int hex_to_bytes(const char *hex, unsigned char out[16]) {
    if (strlen(hex) != 32) return -1;
    for (int i = 0; i < 16; i++)
        if (sscanf(hex + 2 * i, "%2hhx", &out[i]) != 1) return -1;
    return 0;
}

/* Shape and element from a datashape "D1 * D2 * element". */
static int parse_type(df_var *v) {
    const char *p = v->type;
    v->ndim = 0;
    for (;;) {
        char *e;
        long long d = strtoll(p, &e, 10);
        if (e == p || strncmp(e, " * ", 3) != 0) break;
        if (v->ndim == DF_MAX_DIMS || d < 0) return -1;
        v->shape[v->ndim++] = d;
        p = e + 3;
    }
    if (strlen(p) >= sizeof v->element) return -1;
    strcpy(v->element, p);
    return 0;
}

size_t df_element_size(const char *element) {
    static const struct { const char *name; size_t size; } known[] = {
        {"bool", 1}, {"int8", 1}, {"uint8", 1}, {"int16", 2}, {"uint16", 2}, {"float16", 2},
        {"int32", 4}, {"uint32", 4}, {"float32", 4}, {"int64", 8}, {"uint64", 8}, {"float64", 8},
        {"complex64", 8}, {"complex128", 16},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(element, known[i].name) == 0) return known[i].size;
    return 0;
}

static int valid_shm_name(const char *s) {
    if (strncmp(s, "dfab_", 5) != 0 || strlen(s) > 64) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'f') || (*s >= '0' && *s <= '9') || *s == '_')) return 0;
    return 1;
}

/* Map one copy and check every header field a reader relies on; 0, or -1 with a message. */
static int map_copy(df_var *v, const unsigned char fabric[16], const char *node, const char *shm_id,
                    uint64_t extent_offset, uint64_t data_offset, uint64_t extent_id, char *err, size_t errlen) {
    if (!valid_shm_name(shm_id)) return fail(err, errlen, "%s is not a block name", shm_id);
    int fd = shm_open(shm_id, O_RDONLY, 0);
    if (fd < 0) return fail(err, errlen, "block %s of node %s: %s", shm_id, node, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < BLOCK_HEADER_SIZE) {
        close(fd);
        return fail(err, errlen, "block %s is too small to be a block", shm_id);
    }
    size_t size = st.st_size;
    unsigned char *m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return fail(err, errlen, "mmap of %s failed: %s", shm_id, strerror(errno));
    const char *why = NULL;
    char tmp[DF_ERR_LEN];
    uint16_t node_len = rd16(m + 56);
    if (memcmp(m, "DFABRIC\0", 8) != 0) why = "bad block magic";
    else if (rd32(m + 8) != LAYOUT_VERSION) {
        snprintf(tmp, sizeof tmp, "block layout version %u, this reader reads %d", rd32(m + 8), LAYOUT_VERSION);
        why = tmp;
    } else if (rd32(m + 12) != BLOCK_HEADER_SIZE || rd64(m + 16) > size) why = "bad block header size";
    else if (memcmp(m + 40, fabric, 16) != 0) why = "the block belongs to another fabric";
    else if (BLOCK_FIXED + node_len > 448 || strlen(node) != node_len || memcmp(m + BLOCK_FIXED, node, node_len) != 0)
        why = "the block belongs to another node";
    else if (extent_offset + EXTENT_FIXED > size || extent_offset < BLOCK_HEADER_SIZE) why = "extent offset out of the block";
    if (!why) {
        const unsigned char *x = m + extent_offset;
        uint32_t state = rd32(x + 4), rel = rd32(x + 32), nl = rd32(x + 36), tl = rd32(x + 40);
        uint64_t esize = rd64(x + 8), dsize = rd64(x + 16);
        if (memcmp(x, "DFEX", 4) != 0) why = "bad extent magic";
        else if (state != STATE_SEALED && state != STATE_DELETED) why = "the extent is not sealed";
        else if (rd64(x + 24) != extent_id) why = "the extent id differs (the lease's copy is not there)";
        else if (extent_offset + esize > size || extent_offset + rel != data_offset || rel + dsize > esize)
            why = "extent sizes out of the block";
        else if (nl >= sizeof v->name || tl >= sizeof v->type || EXTENT_FIXED + nl + tl > rel) why = "name or type too long";
        else {
            char name[sizeof v->name];
            memcpy(name, x + EXTENT_FIXED, nl);
            name[nl] = 0;
            if (strcmp(name, v->name) != 0) why = "the extent holds another name";
            else {
                memcpy(v->type, x + EXTENT_FIXED + nl, tl);
                v->type[tl] = 0;
                v->nbytes = dsize;
                if (parse_type(v) != 0) why = "the type string does not parse";
            }
        }
    }
    if (why) {
        munmap(m, size);
        return fail(err, errlen, "block %s of node %s: %s", shm_id, node, why);
    }
    v->map = m;
    v->map_size = size;
    v->data = m + data_offset;
    snprintf(v->node, sizeof v->node, "%s", node);
    return 0;
}

static void lease_path(char *out, size_t len, const char *what) {
    char enc[3200];
    url_encode(what, enc, sizeof enc);
    snprintf(out, len, "/fabric/api/v1/lease/%s", enc);
}

static int refused(const char *body, int status, char *err, size_t errlen) {
    char msg[DF_ERR_LEN - 16] = "";
    const char *end = body + strlen(body);
    if (*body != '{' || json_string(json_member(body, end, "message"), msg, sizeof msg) != 0)
        snprintf(msg, sizeof msg, "HTTP status %d", status);
    return fail(err, errlen, "%s", msg);
}

int df_open(const char *host, int port, const char *name, double ttl, df_var *v, char *err, size_t errlen) {
    memset(v, 0, sizeof *v);
    if (strlen(name) >= sizeof v->name) return fail(err, errlen, "name too long");
    snprintf(v->host, sizeof v->host, "%s", host);
    v->port = port;
    char path[4096];
    lease_path(path, sizeof path, name);
    snprintf(path + strlen(path), sizeof path - strlen(path), "?ttl=%g", ttl);
    int status = 0;
    char *body = http(host, port, "POST", path, &status, err, errlen);
    if (!body) return -1;
    if (status != 201) {
        refused(body, status, err, errlen);
        free(body);
        return -1;
    }
    const char *end = body + strlen(body);
    char fabric_hex[64];
    unsigned char fabric[16];
    const char *expires = json_member(body, end, "expires");
    if (json_string(json_member(body, end, "lease"), v->lease, sizeof v->lease) != 0 ||
        json_string(json_member(body, end, "name"), v->name, sizeof v->name) != 0 ||
        json_string(json_member(body, end, "dtype"), v->dtype, sizeof v->dtype) != 0 ||
        json_string(json_member(body, end, "fabric_id"), fabric_hex, sizeof fabric_hex) != 0 ||
        hex_to_bytes(fabric_hex, fabric) != 0 || !expires) {
        free(body);
        return fail(err, errlen, "the lease answer lacks a field this reader needs");
    }
    v->expires = strtod(expires, NULL);
    const char *locs = json_member(body, end, "locations");
    char last[DF_ERR_LEN] = "it has no copy";
    int ok = -1;
    if (locs && *locs == '[') {
        const char *p = locs + 1, *lend = skip_nested(locs);
        while (ok != 0 && p < lend) {
            while (p < lend && *p != '{') p++;
            if (p >= lend) break;
            const char *oend = skip_nested(p);
            char node[256], shm[128];
            uint64_t eo, doff, eid;
            if (json_string(json_member(p, oend, "node"), node, sizeof node) == 0 &&
                json_string(json_member(p, oend, "shm_id"), shm, sizeof shm) == 0 &&
                json_u64(json_member(p, oend, "extent_offset"), &eo) == 0 &&
                json_u64(json_member(p, oend, "data_offset"), &doff) == 0 &&
                json_u64(json_member(p, oend, "extent_id"), &eid) == 0)
                ok = map_copy(v, fabric, node, shm, eo, doff, eid, last, sizeof last);
            p = oend;
        }
    }
    free(body);
    if (ok != 0) {
        char keep[DF_ERR_LEN];
        snprintf(keep, sizeof keep, "%s", last);
        df_close(v);
        return fail(err, errlen, "no copy of %s can be mapped on this machine (%s); read it with GET /fabric/api/v1/data/NAME",
                    name, keep);
    }
    return 0;
}

int df_renew(df_var *v, double ttl, char *err, size_t errlen) {
    char path[4096], enc[128];
    lease_path(path, sizeof path, v->name);
    url_encode(v->lease, enc, sizeof enc);
    snprintf(path + strlen(path), sizeof path - strlen(path), "?ttl=%g&lease=%s", ttl, enc);
    int status = 0;
    char *body = http(v->host, v->port, "POST", path, &status, err, errlen);
    if (!body) return -1;
    int rc = 0;
    if (status != 200) rc = refused(body, status, err, errlen);
    else {
        const char *e = json_member(body, body + strlen(body), "expires");
        if (e) v->expires = strtod(e, NULL);
    }
    free(body);
    return rc;
}

int df_lease_valid(const df_var *v, double margin) { return v->data != NULL && now() + margin < v->expires; }

void df_close(df_var *v) {
    if (v->map) munmap(v->map, v->map_size);
    v->map = NULL;
    v->data = NULL;
    if (v->lease[0]) {
        char path[256], err[DF_ERR_LEN];
        int status;
        snprintf(path, sizeof path, "/fabric/api/v1/lease/%s", v->lease);
        free(http(v->host, v->port, "DELETE", path, &status, err, sizeof err));
        v->lease[0] = 0;
    }
}
