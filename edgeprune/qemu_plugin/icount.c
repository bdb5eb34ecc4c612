/* QEMU TCG plugin: exact retired-instruction counts at marker addresses.
 *
 * Debian's QEMU 7.2 supports plugins but ships no qemu-plugin.h, so the few v1 API entry points
 * used here are declared by hand. Usage:
 *   -plugin libicount.so,out=/abs/log.txt,mark=0x1234,mark=0x5678
 * Every time execution reaches a marker address, "<addr-hex> <instructions so far>" is recorded;
 * the log is written when QEMU exits.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, int op, void *ptr,
                                                uint64_t imm);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, vcpu_udata_cb_t cb,
                                            int flags, void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAX_MARKS 64
#define MAX_LOG (1u << 20)

static uint64_t insn_count;
static uint64_t marks[MAX_MARKS];
static int n_marks;
static char out_path[4096];
static uint64_t log_addr[MAX_LOG], log_count[MAX_LOG];
static unsigned log_len;

static void on_mark(unsigned int vcpu, void *udata) {
  (void)vcpu;
  if (log_len < MAX_LOG) {
    log_addr[log_len] = (uint64_t)(uintptr_t)udata;
    log_count[log_len] = insn_count;
    log_len++;
  }
}

static void on_tb(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  for (size_t i = 0; i < n; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    uint64_t pc = qemu_plugin_insn_vaddr(insn);
    for (int m = 0; m < n_marks; m++)
      if (marks[m] == pc)
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_mark, 0 /* NO_REGS */,
                                               (void *)(uintptr_t)pc);
    qemu_plugin_register_vcpu_insn_exec_inline(insn, 0 /* INLINE_ADD_U64 */, &insn_count, 1);
  }
}

static void on_plugin_exit(qemu_plugin_id_t id, void *udata) {
  (void)id; (void)udata;
  FILE *f = fopen(out_path, "w");
  if (!f) return;
  for (unsigned i = 0; i < log_len; i++)
    fprintf(f, "%llx %llu\n", (unsigned long long)log_addr[i], (unsigned long long)log_count[i]);
  fprintf(f, "total %llu\n", (unsigned long long)insn_count);
  fclose(f);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const qemu_info_t *info, int argc,
                                                               char **argv) {
  (void)info;
  for (int i = 0; i < argc; i++) {
    if (strncmp(argv[i], "out=", 4) == 0) {
      strncpy(out_path, argv[i] + 4, sizeof out_path - 1);
    } else if (strncmp(argv[i], "mark=", 5) == 0 && n_marks < MAX_MARKS) {
      marks[n_marks++] = strtoull(argv[i] + 5, NULL, 0);
    } else {
      fprintf(stderr, "icount plugin: unknown argument %s\n", argv[i]);
      return -1;
    }
  }
  if (!out_path[0]) {
    fprintf(stderr, "icount plugin: out=PATH is required\n");
    return -1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb);
  qemu_plugin_register_atexit_cb(id, on_plugin_exit, NULL);
  return 0;
}
