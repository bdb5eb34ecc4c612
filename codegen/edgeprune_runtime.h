/* edgeprune runtime shim: the three symbols TVM-generated kernels need, nothing else.
 *
 * Kernel scratch comes from a window of the model's static arena that the generated model.c
 * opens before each kernel call (its size is known at build time); requests are LIFO, as TVM
 * frees them, so a bump pointer is enough. No malloc, no TVM runtime.
 */
#ifndef EDGEPRUNE_RUNTIME_H
#define EDGEPRUNE_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Open the scratch window [base, base + size) for the next kernel call. */
void ep_workspace_set(void *base, size_t size);

/* The last error a kernel raised (kind and first message part), or NULL. */
const char *ep_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
