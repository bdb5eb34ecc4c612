/* RISC-V (rv32/rv64, M-mode) startup: gp/sp/mtvec, FPU on, .data copied, .bss zeroed, stack
 * painted, main, exit through the sifive_test device. */
#include <stdint.h>

#include "board.h"

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[];
extern uint32_t __stack_limit[], __stack_top[];
extern char __tls_base[];
extern void _set_tls(void *tls);
extern int main(void);

#define STACK_PAINT 0xDEADBEEFu

void trap_handler(void);

/* Entry (the ELF entry point; QEMU -bios none jumps here in M-mode). gp must be loaded without
 * linker relaxation, or the linker would rewrite the load relative to gp itself. */
__asm__(
    ".section .text.start, \"ax\"\n"
    ".global _start\n"
    "_start:\n"
    ".option push\n"
    ".option norelax\n"
    "  la gp, __global_pointer$\n"
    ".option pop\n"
    "  la sp, __stack_top\n"
    "  la t0, trap_entry\n"
    "  csrw mtvec, t0\n"
    "  j reset_c\n"
    ".balign 4\n"
    "trap_entry:\n"
    "  la sp, __stack_top\n"
    "  j trap_handler\n");

__attribute__((noreturn, used)) void reset_c(void) {
#if defined(__riscv_flen)
  /* mstatus.FS = Initial: floating-point instructions trap while FS is Off. */
  __asm__ volatile("csrs mstatus, %0" ::"r"(1u << 13));
#endif
  for (uint32_t *s = __data_load, *d = __data_start; d < __data_end;) *d++ = *s++;
  for (uint32_t *d = __bss_start; d < __bss_end;) *d++ = 0;
  /* Paint the stack below the current frame so its high-water mark can be measured. */
  uint32_t *sp;
  __asm__ volatile("mv %0, sp" : "=r"(sp));
  for (uint32_t *p = __stack_limit; p < sp - 16;) *p++ = STACK_PAINT;
  _set_tls(__tls_base);
  board_exit(main());
}

uint32_t board_stack_used(void) {
  const uint32_t *p = __stack_limit;
  while (p < __stack_top && *p == STACK_PAINT) p++;
  return (uint32_t)((uintptr_t)__stack_top - (uintptr_t)p);
}

uint32_t board_stack_size(void) {
  return (uint32_t)((uintptr_t)__stack_top - (uintptr_t)__stack_limit);
}

static void put_str(const char *s) {
  while (*s) board_putc(*s++);
}

static void put_hex(uintptr_t v) {
  static const char digits[] = "0123456789abcdef";
  for (int i = (int)sizeof v * 2 - 1; i >= 0; i--) board_putc(digits[(v >> (4 * i)) & 15]);
}

/* Any trap (illegal instruction, misaligned or faulting access, ecall): report, exit 126. */
__attribute__((noreturn, used)) void trap_handler(void) {
  uintptr_t cause, pc;
  __asm__ volatile("csrr %0, mcause\n csrr %1, mepc" : "=r"(cause), "=r"(pc));
  put_str("\nFAULT pc=0x");
  put_hex(pc);
  put_str(" mcause=0x");
  put_hex(cause);
  put_str("\n");
  board_exit(126);
}
