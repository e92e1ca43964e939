/*
 * A fake libnvidia-ml.so for tests: it exports the NVML symbols the agent
 * calls (through nvml-wrapper, exactly as with the real library) and answers
 * from a plain text file that the test writes and may rewrite at any time.
 *
 * The file is named by NEMBO_FAKE_NVML (default: ./fake-nvml.txt). One
 * "key value" pair per line; "key.N value" overrides "key value" for GPU N:
 *
 *   gpus 8                      number of GPUs
 *   name NVIDIA H100 80GB HBM3  board name (the rest of the line)
 *   util 40      mem_util 10    percent
 *   fb_total 85899345920   fb_used 1073741824   (bytes; free = total - used)
 *   temp 45      power_mw 300000   power_limit_mw 700000   energy_mj 123456
 *   sm_clock 1980   mem_clock 2619   throttle 0   pcie_rx 1000   pcie_tx 2000
 *   ecc_corrected 0   ecc_uncorrected 0   mig 0   procs 0
 *   nvlink_tx_kib 0   nvlink_rx_kib 0   NVLink data counters, KiB since the
 *                               driver loaded (all links together)
 *   retired_sbe 0   retired_dbe 0   pages retired for single-/double-bit ECC
 *   retired_pending 0           1: pages wait for a reset to retire
 *   pids.N 1234 5678            the compute processes on GPU N (else procs.N fake ones)
 *   xid 3 79                    an XID event on GPU 3 (each line is one event,
 *                               delivered once, in file order)
 *   unsupported.N temp          this metric answers NOT_SUPPORTED on GPU N
 *   lost.N 1                    GPU N has fallen off the bus (GPU_IS_LOST)
 *   gpm.N 1                     GPU N supports GPM (Hopper and newer); else
 *                               nvmlGpmQueryDeviceSupport says it does not
 *   gpm_gr 40.5   gpm_sm 30   gpm_tensor 12.25   what nvmlGpmMetricsGet
 *                               answers for GRAPHICS_UTIL, SM_UTIL and
 *                               ANY_TENSOR_UTIL: percent, as NVML reports
 *                               them; unsupported.N gr_active / sm_active /
 *                               tensor_active makes one answer NOT_SUPPORTED
 *
 * Missing keys read as 0. This is test support, not a model of a GPU.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <pthread.h>

typedef int nvmlReturn_t;
#define OK 0
#define ERR_INVALID_ARGUMENT 2
#define ERR_NOT_SUPPORTED 3
#define ERR_INSUFFICIENT_SIZE 7
#define ERR_TIMEOUT 10
#define ERR_GPU_IS_LOST 15
#define ERR_ARGUMENT_VERSION_MISMATCH 25

typedef struct { int index; } fake_device;
typedef fake_device *nvmlDevice_t;
typedef struct { int delivered; } fake_event_set;
typedef fake_event_set *nvmlEventSet_t;

typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    signed int siVal;
} nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

#define MAX_GPUS 64
static fake_device devices[MAX_GPUS];

static const char *path(void) {
    const char *p = getenv("NEMBO_FAKE_NVML");
    return p ? p : "fake-nvml.txt";
}

/* The file's contents, re-read only when it changes (a real NVML call
 * costs microseconds; re-reading on every call would make the agent's
 * footprint measurements measure this fake instead). */
/* Guards `contents`: the agent samples and waits for events on two threads. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char *contents;
static struct timespec seen_mtime;
static off_t seen_size = -1;

static const char *values(void) {
    struct stat st;
    if (stat(path(), &st) != 0) return NULL;
    if (contents && st.st_size == seen_size && st.st_mtim.tv_sec == seen_mtime.tv_sec &&
        st.st_mtim.tv_nsec == seen_mtime.tv_nsec)
        return contents;
    FILE *f = fopen(path(), "r");
    if (!f) return NULL;
    char *buf = calloc(1, (size_t)st.st_size + 1);
    size_t n = buf ? fread(buf, 1, (size_t)st.st_size, f) : 0;
    fclose(f);
    if (!buf) return NULL;
    buf[n] = 0;
    free(contents);
    contents = buf;
    seen_mtime = st.st_mtim;
    seen_size = st.st_size;
    return contents;
}

/* Finds "key.N" (or "key") in the file; copies the value into out. */
static int lookup_locked(const char *key, int index, char *out, size_t len);

static int lookup(const char *key, int index, char *out, size_t len) {
    pthread_mutex_lock(&mu);
    int found = lookup_locked(key, index, out, len);
    pthread_mutex_unlock(&mu);
    return found;
}

static int lookup_locked(const char *key, int index, char *out, size_t len) {
    const char *text = values();
    if (!text) return 0;
    char specific[128];
    snprintf(specific, sizeof specific, "%s.%d", key, index);
    size_t klen = strlen(key), slen = strlen(specific);
    int found = 0;
    for (const char *line = text; *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : "") {
        size_t n = strcspn(line, "\r\n");
        const char *space = memchr(line, ' ', n);
        if (!space) continue;
        size_t name = (size_t)(space - line);
        int is_specific = name == slen && strncmp(line, specific, slen) == 0;
        int is_general = name == klen && strncmp(line, key, klen) == 0;
        if (is_specific || (found != 2 && is_general)) {
            found = is_specific ? 2 : 1;
            size_t vlen = n - name - 1;
            if (vlen >= len) vlen = len - 1;
            memcpy(out, space + 1, vlen);
            out[vlen] = 0;
        }
    }
    return found;
}

static unsigned long long num(const char *key, int index) {
    char v[128];
    return lookup(key, index, v, sizeof v) ? strtoull(v, NULL, 10) : 0;
}

static double dbl(const char *key, int index) {
    char v[128];
    return lookup(key, index, v, sizeof v) ? strtod(v, NULL) : 0.0;
}

/* NOT_SUPPORTED or GPU_IS_LOST for this metric on this GPU, else OK. */
static nvmlReturn_t check(nvmlDevice_t d, const char *metric) {
    if (!d) return ERR_INVALID_ARGUMENT;
    if (num("lost", d->index)) return ERR_GPU_IS_LOST;
    char v[256];
    if (lookup("unsupported", d->index, v, sizeof v) && strstr(v, metric)) return ERR_NOT_SUPPORTED;
    return OK;
}

nvmlReturn_t nvmlInit_v2(void) { return OK; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return OK; }
nvmlReturn_t nvmlShutdown(void) { return OK; }
const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case ERR_NOT_SUPPORTED: return "Not Supported";
    case ERR_TIMEOUT: return "Timeout";
    case ERR_GPU_IS_LOST: return "GPU is lost";
    default: return "fake NVML error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    snprintf(version, length, "580.00-fake");
    return OK;
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { *v = 13000; return OK; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    unsigned long long n = num("gpus", -1);
    *count = (unsigned int)(n > MAX_GPUS ? MAX_GPUS : n);
    return OK;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (index >= MAX_GPUS || index >= num("gpus", -1)) return ERR_INVALID_ARGUMENT;
    devices[index].index = (int)index;
    *device = &devices[index];
    return OK;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *index) {
    if (!d) return ERR_INVALID_ARGUMENT;
    *index = (unsigned int)d->index;
    return OK;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    nvmlReturn_t r = check(d, "name");
    if (r) return r;
    if (!lookup("name", d->index, name, length)) snprintf(name, length, "NVIDIA H100 80GB HBM3");
    return OK;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    nvmlReturn_t r = check(d, "uuid");
    if (r) return r;
    snprintf(uuid, length, "GPU-fa4e0000-0000-4000-8000-%012d", d->index);
    return OK;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci) {
    nvmlReturn_t r = check(d, "pci");
    if (r) return r;
    memset(pci, 0, sizeof *pci);
    pci->bus = (unsigned int)(0x10 + d->index);
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    nvmlReturn_t r = check(d, "memory");
    if (r) return r;
    m->total = num("fb_total", d->index);
    m->used = num("fb_used", d->index);
    m->reserved = 0;
    m->free = m->total > m->used ? m->total - m->used : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    nvmlReturn_t r = check(d, "util");
    if (r) return r;
    u->gpu = (unsigned int)num("util", d->index);
    u->memory = (unsigned int)num("mem_util", d->index);
    return OK;
}

#define SCALAR(fn, metric, type, key)                       \
    nvmlReturn_t fn(nvmlDevice_t d, type *out) {            \
        nvmlReturn_t r = check(d, metric);                  \
        if (r) return r;                                    \
        *out = (type)num(key, d->index);                    \
        return OK;                                          \
    }

SCALAR(nvmlDeviceGetPowerUsage, "power", unsigned int, "power_mw")
SCALAR(nvmlDeviceGetEnforcedPowerLimit, "power_limit", unsigned int, "power_limit_mw")
SCALAR(nvmlDeviceGetTotalEnergyConsumption, "energy", unsigned long long, "energy_mj")
SCALAR(nvmlDeviceGetCurrentClocksThrottleReasons, "throttle", unsigned long long, "throttle")

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *t) {
    (void)sensor;
    nvmlReturn_t r = check(d, "temp");
    if (r) return r;
    *t = (unsigned int)num("temp", d->index);
    return OK;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *clock) {
    nvmlReturn_t r = check(d, "clock");
    if (r) return r;
    /* NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2 */
    *clock = (unsigned int)num(type == 2 ? "mem_clock" : "sm_clock", d->index);
    return OK;
}

nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned int *value) {
    nvmlReturn_t r = check(d, "pcie");
    if (r) return r;
    /* NVML_PCIE_UTIL_TX_BYTES = 0, NVML_PCIE_UTIL_RX_BYTES = 1 */
    *value = (unsigned int)num(counter == 1 ? "pcie_rx" : "pcie_tx", d->index);
    return OK;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int error_type, int counter,
                                         unsigned long long *count) {
    (void)counter;
    nvmlReturn_t r = check(d, "ecc");
    if (r) return r;
    /* NVML_MEMORY_ERROR_TYPE_CORRECTED = 0, UNCORRECTED = 1 */
    *count = num(error_type == 1 ? "ecc_uncorrected" : "ecc_corrected", d->index);
    return OK;
}

/* NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX / _RX, for the aggregate of all
 * links (scopeId UINT_MAX); anything else is NOT_SUPPORTED per value. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t d, int count, nvmlFieldValue_t *values) {
    if (!d || count <= 0 || !values) return ERR_INVALID_ARGUMENT;
    nvmlReturn_t r = check(d, "nvlink");
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        const char *key = v->fieldId == 138 ? "nvlink_tx_kib" : v->fieldId == 139 ? "nvlink_rx_kib" : NULL;
        v->valueType = 3; /* NVML_VALUE_TYPE_UNSIGNED_LONG_LONG */
        if (r || !key || v->scopeId != 0xFFFFFFFFu) {
            v->nvmlReturn = r ? r : ERR_NOT_SUPPORTED;
            continue;
        }
        v->nvmlReturn = OK;
        v->value.ullVal = num(key, d->index);
    }
    return OK;
}

static nvmlReturn_t retired(nvmlDevice_t d, int cause, unsigned int *count,
                            unsigned long long *addresses, unsigned long long *timestamps) {
    nvmlReturn_t r = check(d, "retired");
    if (r) return r;
    /* NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0, DOUBLE_BIT = 1 */
    unsigned int n = (unsigned int)num(cause == 1 ? "retired_dbe" : "retired_sbe", d->index);
    if (*count < n) {
        *count = n;
        return n ? ERR_INSUFFICIENT_SIZE : OK;
    }
    for (unsigned int i = 0; i < n; i++) {
        if (addresses) addresses[i] = 0x1000ull * (i + 1);
        if (timestamps) timestamps[i] = 1700000000ull + i;
    }
    *count = n;
    return OK;
}

nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t d, int cause, unsigned int *count,
                                       unsigned long long *addresses) {
    return retired(d, cause, count, addresses, NULL);
}

nvmlReturn_t nvmlDeviceGetRetiredPages_v2(nvmlDevice_t d, int cause, unsigned int *count,
                                          unsigned long long *addresses,
                                          unsigned long long *timestamps) {
    return retired(d, cause, count, addresses, timestamps);
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t d, int *pending) {
    nvmlReturn_t r = check(d, "retired");
    if (r) return r;
    *pending = num("retired_pending", d->index) ? 1 : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *current, unsigned int *pending) {
    nvmlReturn_t r = check(d, "mig");
    if (r) return r;
    *current = *pending = (unsigned int)num("mig", d->index);
    return OK;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    nvmlReturn_t r = check(d, "procs");
    if (r) return r;
    /* "pids.N 123 456" names the processes; else "procs.N" counts fake ones. */
    unsigned int pids[64], n = 0;
    char list[512];
    if (lookup("pids", d->index, list, sizeof list)) {
        for (char *tok = strtok(list, " "); tok && n < 64; tok = strtok(NULL, " "))
            pids[n++] = (unsigned int)strtoul(tok, NULL, 10);
    } else {
        n = (unsigned int)num("procs", d->index);
        if (n > 64) n = 64;
        for (unsigned int i = 0; i < n; i++) pids[i] = 1000 + i;
    }
    if (*count < n || !infos) {
        *count = n;
        return n == 0 ? OK : ERR_INSUFFICIENT_SIZE;
    }
    for (unsigned int i = 0; i < n; i++) {
        infos[i].pid = pids[i];
        infos[i].usedGpuMemory = 1ULL << 30;
        infos[i].gpuInstanceId = infos[i].computeInstanceId = 0xFFFFFFFF;
    }
    *count = n;
    return OK;
}

/* ---- XID events ---- */

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    *set = calloc(1, sizeof(fake_event_set));
    return *set ? OK : ERR_INVALID_ARGUMENT;
}
nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) { free(set); return OK; }
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types) {
    nvmlReturn_t r = check(d, "events");
    if (r) return r;
    *types = 8; /* nvmlEventTypeXidCriticalError */
    return OK;
}
nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
    (void)types;
    (void)set;
    return check(d, "events");
}

/* The n-th "xid GPU CODE" line of the file, if there is one. */
static int nth_xid(int n, int *gpu, unsigned long long *code) {
    pthread_mutex_lock(&mu);
    const char *text = values();
    int seen = 0, found = 0;
    for (const char *line = text; line && *line && !found;
         line = strchr(line, '\n') ? strchr(line, '\n') + 1 : "") {
        if (strncmp(line, "xid ", 4) == 0 && seen++ == n) {
            found = sscanf(line + 4, "%d %llu", gpu, code) == 2;
            if (!found) break;
        }
    }
    pthread_mutex_unlock(&mu);
    return found;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    /* Polls the (cached) file: a real driver blocks in the kernel instead. */
    struct timespec tick = {0, 100 * 1000 * 1000};
    for (unsigned int waited = 0;; waited += 100) {
        int gpu;
        unsigned long long code;
        if (nth_xid(set->delivered, &gpu, &code) && gpu >= 0 && gpu < MAX_GPUS) {
            set->delivered++;
            devices[gpu].index = gpu;
            memset(data, 0, sizeof *data);
            data->device = &devices[gpu];
            data->eventType = 8;
            data->eventData = code;
            return OK;
        }
        if (waited >= timeout_ms) return ERR_TIMEOUT;
        nanosleep(&tick, NULL);
    }
}

/* ---- GPM (GPU Performance Monitoring, Hopper and newer) ----
 * Layouts as in nvml.h (and nvml-wrapper-sys's bindings): the caller
 * allocates nvmlGpmMetricsGet_t with room for NVML_GPM_METRIC_MAX metrics. */

#define NVML_GPM_METRIC_MAX 210
#define NVML_GPM_METRICS_GET_VERSION 1
#define NVML_GPM_SUPPORT_VERSION 1

/* Opaque to callers; here: which GPU it was taken on, and when. */
typedef struct nvmlGpmSample_st {
    int index;
    int taken;
    struct timespec at;
} *nvmlGpmSample_t;

typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    struct {
        char *shortName;
        char *longName;
        char *unit;
    } metricInfo;
} nvmlGpmMetric_t;

typedef struct {
    unsigned int version;
    unsigned int numMetrics;
    nvmlGpmSample_t sample1;
    nvmlGpmSample_t sample2;
    nvmlGpmMetric_t metrics[NVML_GPM_METRIC_MAX];
} nvmlGpmMetricsGet_t;

typedef struct {
    unsigned int version;
    unsigned int isSupportedDevice;
} nvmlGpmSupport_t;

_Static_assert(sizeof(nvmlGpmMetric_t) == 40, "nvmlGpmMetric_t as in nvml.h");
_Static_assert(offsetof(nvmlGpmMetricsGet_t, metrics) == 24, "nvmlGpmMetricsGet_t as in nvml.h");
_Static_assert(sizeof(nvmlGpmMetricsGet_t) == 24 + 40 * NVML_GPM_METRIC_MAX, "metrics[MAX]");
_Static_assert(sizeof(nvmlGpmSupport_t) == 8, "nvmlGpmSupport_t as in nvml.h");

nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t d, nvmlGpmSupport_t *support) {
    if (!support) return ERR_INVALID_ARGUMENT;
    if (support->version != NVML_GPM_SUPPORT_VERSION) return ERR_ARGUMENT_VERSION_MISMATCH;
    nvmlReturn_t r = check(d, "gpm");
    if (r == ERR_NOT_SUPPORTED) {
        support->isSupportedDevice = 0;
        return OK;
    }
    if (r) return r;
    support->isSupportedDevice = num("gpm", d->index) ? 1 : 0;
    return OK;
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample) {
    if (!sample) return ERR_INVALID_ARGUMENT;
    *sample = calloc(1, sizeof **sample);
    return *sample ? OK : ERR_INVALID_ARGUMENT;
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample) {
    if (!sample) return ERR_INVALID_ARGUMENT;
    free(sample);
    return OK;
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t d, nvmlGpmSample_t sample) {
    if (!sample) return ERR_INVALID_ARGUMENT;
    nvmlReturn_t r = check(d, "gpm");
    if (r) return r;
    if (!num("gpm", d->index)) return ERR_NOT_SUPPORTED;
    sample->index = d->index;
    sample->taken = 1;
    clock_gettime(CLOCK_MONOTONIC, &sample->at);
    return OK;
}

/* The file's values for the interval between the two samples. Like NVML,
 * it wants two samples of one GPU, the older first. */
nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *m) {
    if (!m) return ERR_INVALID_ARGUMENT;
    if (m->version != NVML_GPM_METRICS_GET_VERSION) return ERR_ARGUMENT_VERSION_MISMATCH;
    nvmlGpmSample_t a = m->sample1, b = m->sample2;
    if (m->numMetrics > NVML_GPM_METRIC_MAX || !a || !b || !a->taken || !b->taken ||
        a->index != b->index)
        return ERR_INVALID_ARGUMENT;
    if (a->at.tv_sec > b->at.tv_sec || (a->at.tv_sec == b->at.tv_sec && a->at.tv_nsec >= b->at.tv_nsec))
        return ERR_INVALID_ARGUMENT;
    static const struct {
        unsigned int id;
        const char *key, *name, *long_name;
    } known[] = {
        {1, "gpm_gr", "gr_active", "percent of time any compute/graphics app was active"},
        {2, "gpm_sm", "sm_active", "percent of SMs that were busy"},
        {5, "gpm_tensor", "tensor_active", "percent of time the SMs were doing any tensor operations"},
    };
    char unsupported[256] = "";
    lookup("unsupported", b->index, unsupported, sizeof unsupported);
    for (unsigned int i = 0; i < m->numMetrics; i++) {
        nvmlGpmMetric_t *metric = &m->metrics[i];
        metric->nvmlReturn = ERR_NOT_SUPPORTED;
        metric->value = 0;
        memset(&metric->metricInfo, 0, sizeof metric->metricInfo);
        for (size_t k = 0; k < sizeof known / sizeof known[0]; k++) {
            if (metric->metricId != known[k].id || strstr(unsupported, known[k].name)) continue;
            metric->nvmlReturn = OK;
            metric->value = dbl(known[k].key, b->index);
            metric->metricInfo.shortName = (char *)known[k].name;
            metric->metricInfo.longName = (char *)known[k].long_name;
            metric->metricInfo.unit = (char *)"%";
        }
    }
    return OK;
}
