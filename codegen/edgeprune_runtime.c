#include "edgeprune_runtime.h"

#include "tvm/runtime/c_backend_api.h"

#define EP_WS_ALIGN 16u /* must match WORKSPACE_ALIGN in edgeprune/lower.py */

static uint8_t *ws_base, *ws_top, *ws_end;
static const char *last_error;

void ep_workspace_set(void *base, size_t size) {
  ws_base = ws_top = (uint8_t *)base;
  ws_end = ws_base + size;
}

void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes,
                               int dtype_code_hint, int dtype_bits_hint) {
  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;
  uint64_t n = (nbytes + EP_WS_ALIGN - 1u) & ~(uint64_t)(EP_WS_ALIGN - 1u);
  if (ws_top == NULL || n > (uint64_t)(ws_end - ws_top)) {
    last_error = "workspace exhausted";
    return NULL;
  }
  void *p = ws_top;
  ws_top += n;
  return p;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {
  (void)device_type; (void)device_id;
  uint8_t *p = (uint8_t *)ptr;
  if (p < ws_base || p > ws_top) { /* not LIFO: a kernel freed out of order */
    last_error = "workspace freed out of order";
    return -1;
  }
  ws_top = p;
  return 0;
}

void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t num_parts) {
  last_error = (num_parts > 0 && parts[0]) ? parts[0] : kind;
}

const char *ep_last_error(void) { return last_error; }
