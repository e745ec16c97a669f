/*
 * fsync_shim.c: an LD_PRELOAD library that records how much of each file is
 * durable, so a test can simulate a host crash (power cut, kernel panic)
 * faithfully: after SIGKILL, fulfilment/harness/hostcrash.py cuts every append-only file
 * back to the length this shim last saw made durable, dropping exactly what
 * was written but never synced (which the page cache would otherwise keep).
 *
 * Built at test time (fulfilment/harness/hostcrash.py: cc -shared -fPIC -O2 ... -ldl) and
 * loaded into redis-server with LD_PRELOAD=... FSYNC_SHIM_LOG=<file>.
 *
 * The log is append-only, one record per line, each written with a single
 * write(2) to a descriptor opened with O_APPEND, so records from concurrent
 * threads (Redis's main thread and its bio fsync thread) never interleave:
 *
 *   S <dev> <ino> <length> <path>   a sync of a regular file succeeded; the
 *                                   first <length> bytes are durable
 *   T <dev> <ino> <length> <path>   the file was truncated to <length>
 *   D <dev> <ino> 0 <path>          the file's last name went (unlink, or
 *                                   rename over it): forget its inode, which
 *                                   the file system may hand out again
 *
 * (fields separated by tabs; <path> is informational, for people).
 * Files are identified by device and inode, not by name, because Redis writes
 * its manifest to a temporary file, syncs it, and renames it.
 *
 * What counts as durable:
 *  - fsync(2) and fdatasync(2) (Redis 7.0 on Linux: redis_fsync is fdatasync,
 *    called from the main thread under "appendfsync always", at shutdown and
 *    for the manifest, and from the bio thread under "everysec"; fsync for the
 *    AOF rewrite's and RDB's temporary files). The length recorded is the
 *    file's size from fstat *before* the call: only data written before a
 *    sync starts is guaranteed by it; bytes another thread appends while it
 *    runs (the main thread writing while the bio thread syncs) may or may not
 *    have reached the disk, so they count as not durable. If the descriptor
 *    no longer names the same file afterwards (closed and reused), nothing is
 *    recorded; if the file shrank meanwhile, the smaller size is recorded.
 *  - sync_file_range(2) is NOT a durability point (its man page: it writes
 *    no metadata and flushes no disk cache; Redis uses it only to start
 *    write-back early and follows it with an fsync) and is not wrapped.
 *  - Syncs of anything but regular files (a directory after a rename) are
 *    passed through unrecorded: directory entries are not modelled, and the
 *    test server disables AOF rewrites so its set of files does not change
 *    after Redis has created them and synced their directory.
 *  - Truncation: recorded after it succeeds, so a later crash cannot keep
 *    bytes beyond a cut Redis made (on loading a torn AOF it cuts the torn
 *    tail off with truncate(2), then appends after it).
 * Redis 7.0 opens nothing O_SYNC/O_DSYNC and calls neither sync(2), syncfs(2)
 * nor msync(2) on its data files, so those are not wrapped.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_truncate)(const char *, off_t);
static int (*real_truncate64)(const char *, off64_t);
static int (*real_rename)(const char *, const char *);
static int (*real_unlink)(const char *);

static int log_fd = -1;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void *next(const char *name) {
    void *symbol = dlsym(RTLD_NEXT, name);
    if (symbol == NULL) {
        fprintf(stderr, "fsync_shim: cannot find %s: %s\n", name, dlerror());
        abort();
    }
    return symbol;
}

static void setup(void) {
    real_fsync = (int (*)(int))next("fsync");
    real_fdatasync = (int (*)(int))next("fdatasync");
    real_ftruncate = (int (*)(int, off_t))next("ftruncate");
    real_ftruncate64 = (int (*)(int, off64_t))next("ftruncate64");
    real_truncate = (int (*)(const char *, off_t))next("truncate");
    real_truncate64 = (int (*)(const char *, off64_t))next("truncate64");
    real_rename = (int (*)(const char *, const char *))next("rename");
    real_unlink = (int (*)(const char *))next("unlink");
    const char *path = getenv("FSYNC_SHIM_LOG");
    if (path == NULL || *path == '\0') {
        fprintf(stderr, "fsync_shim: FSYNC_SHIM_LOG is not set\n");
        abort();
    }
    log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (log_fd == -1) {
        fprintf(stderr, "fsync_shim: cannot open %s: %s\n", path, strerror(errno));
        abort();
    }
}

__attribute__((constructor)) static void init(void) { pthread_once(&once, setup); }

static void ready(void) { pthread_once(&once, setup); }

/* One line, one write(2): O_APPEND makes the position update atomic. */
static void record(char kind, const struct stat *st, long long length, const char *path) {
    char line[4096 + 128];
    int n = snprintf(line, sizeof line, "%c\t%llu\t%llu\t%lld\t%s\n", kind,
                     (unsigned long long)st->st_dev, (unsigned long long)st->st_ino,
                     length, path);
    if (n < 0) abort();
    if ((size_t)n >= sizeof line) { /* a path too long for one line: keep the numbers */
        n = snprintf(line, sizeof line, "%c\t%llu\t%llu\t%lld\t?\n", kind,
                     (unsigned long long)st->st_dev, (unsigned long long)st->st_ino, length);
    }
    ssize_t written;
    do {
        written = write(log_fd, line, (size_t)n);
    } while (written == -1 && errno == EINTR);
    if (written != n) {
        /* A lost record would make the crash drop durable data: stop loudly. */
        fprintf(stderr, "fsync_shim: cannot write its log: %s\n", strerror(errno));
        abort();
    }
}

static void fd_path(int fd, char *out, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, size - 1);
    if (n < 0) n = 0;
    out[n] = '\0';
}

static int synced(int fd, int (*sync)(int)) {
    struct stat before, after;
    int regular = fstat(fd, &before) == 0 && S_ISREG(before.st_mode);
    int rc = sync(fd);
    if (rc == 0 && regular) {
        int saved = errno;
        if (fstat(fd, &after) == 0 && after.st_dev == before.st_dev &&
            after.st_ino == before.st_ino) {
            char path[4096];
            fd_path(fd, path, sizeof path);
            off_t length = after.st_size < before.st_size ? after.st_size : before.st_size;
            record('S', &before, (long long)length, path);
        }
        errno = saved;
    }
    return rc;
}

int fsync(int fd) {
    ready();
    return synced(fd, real_fsync);
}

int fdatasync(int fd) {
    ready();
    return synced(fd, real_fdatasync);
}

static int fd_truncated(int fd, off_t length, int (*cut)(int, off_t)) {
    int rc = cut(fd, length);
    if (rc == 0) {
        int saved = errno;
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
            char path[4096];
            fd_path(fd, path, sizeof path);
            record('T', &st, (long long)length, path);
        }
        errno = saved;
    }
    return rc;
}

int ftruncate(int fd, off_t length) {
    ready();
    return fd_truncated(fd, length, real_ftruncate);
}

int ftruncate64(int fd, off64_t length) {
    ready();
    return fd_truncated(fd, length, real_ftruncate64);
}

static int path_truncated(const char *path, off_t length, int (*cut)(const char *, off_t)) {
    int rc = cut(path, length);
    if (rc == 0) {
        int saved = errno;
        struct stat st;
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) record('T', &st, (long long)length, path);
        errno = saved;
    }
    return rc;
}

int truncate(const char *path, off_t length) {
    ready();
    return path_truncated(path, length, real_truncate);
}

int truncate64(const char *path, off64_t length) {
    ready();
    return path_truncated(path, length, real_truncate64);
}

/* The inode a name held, if removing that name frees the inode. */
static int last_link(const char *path, struct stat *st) {
    return lstat(path, st) == 0 && S_ISREG(st->st_mode) && st->st_nlink == 1;
}

int rename(const char *from, const char *to) {
    ready();
    struct stat st;
    int replaces = last_link(to, &st);
    int rc = real_rename(from, to);
    if (rc == 0 && replaces) {
        int saved = errno;
        struct stat now;
        /* Renaming a file onto another name of itself frees nothing. */
        if (!(lstat(to, &now) == 0 && now.st_dev == st.st_dev && now.st_ino == st.st_ino))
            record('D', &st, 0, to);
        errno = saved;
    }
    return rc;
}

int unlink(const char *path) {
    ready();
    struct stat st;
    int frees = last_link(path, &st);
    int rc = real_unlink(path);
    if (rc == 0 && frees) {
        int saved = errno;
        record('D', &st, 0, path);
        errno = saved;
    }
    return rc;
}
