/* Cortex-M startup: vector table, FPU on, .data copied, .bss zeroed, stack painted, main. */
#include <stdint.h>

#include "board.h"

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[];
extern uint32_t __stack_limit[], __stack_top[];
extern char __tls_base[];
extern void _set_tls(void *tls);
extern int main(void);

#define STACK_PAINT 0xDEADBEEFu

void Reset_Handler(void) __attribute__((noreturn, naked));
void Fault_Handler(void) __attribute__((naked));
void Default_Handler(void);

__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))__stack_top, Reset_Handler, Default_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, Fault_Handler, 0, 0, 0, 0, Default_Handler, Default_Handler, 0,
    Default_Handler, Default_Handler,
};

__attribute__((noreturn, used)) static void reset_c(void) {
#if defined(__ARM_FP)
  /* Full access to CP10/CP11 before the first floating-point instruction. */
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;
  __asm__ volatile("dsb\n isb" ::: "memory");
#endif
  for (uint32_t *s = __data_load, *d = __data_start; d < __data_end;) *d++ = *s++;
  for (uint32_t *d = __bss_start; d < __bss_end;) *d++ = 0;
  /* Paint the stack below the current frame so its high-water mark can be measured. */
  uint32_t *sp;
  __asm__ volatile("mov %0, sp" : "=r"(sp));
  for (uint32_t *p = __stack_limit; p < sp - 16;) *p++ = STACK_PAINT;
  _set_tls(__tls_base);
  board_exit(main());
}

void Reset_Handler(void) {
  __asm__ volatile("ldr r0, =__stack_top\n mov sp, r0\n b reset_c");
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

__attribute__((used)) static void fault_report(const uint32_t *frame) {
  static const char digits[] = "0123456789abcdef";
  uint32_t pc = frame[6];
  put_str("\nFAULT pc=0x");
  for (int i = 7; i >= 0; i--) board_putc(digits[(pc >> (4 * i)) & 15]);
  put_str("\n");
  board_exit(126);
}

/* Hard/bus/usage/memmanage faults: report the stacked PC, then exit 126. */
void Fault_Handler(void) {
  __asm__ volatile(
      "tst lr, #4\n ite eq\n mrseq r0, msp\n mrsne r0, psp\n b fault_report");
}

void Default_Handler(void) {
  put_str("\nFAULT unexpected exception\n");
  board_exit(127);
}
