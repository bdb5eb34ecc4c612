/* QEMU RISC-V virt: ns16550a UART0, sifive_test exit device, mcycle counter. */
#include <stdint.h>

#include "board.h"

#ifndef EP_UART_BASE
#error "EP_UART_BASE must come from the target file ([qemu] uart_base)"
#endif

#define UART_THR (*(volatile uint8_t *)(EP_UART_BASE + 0))
#define UART_RBR (*(volatile uint8_t *)(EP_UART_BASE + 0))
#define UART_LSR (*(volatile uint8_t *)(EP_UART_BASE + 5))
#define LSR_DR 0x01u
#define LSR_THRE 0x20u
#define SIFIVE_TEST (*(volatile uint32_t *)0x00100000u)

/* The 16550 is used as QEMU resets it: touching FCR would flush bytes the host already sent. */
void board_init(void) {}

void board_putc(char c) {
  while (!(UART_LSR & LSR_THRE)) {
  }
  UART_THR = (uint8_t)c;
}

int board_getc(void) {
  while (!(UART_LSR & LSR_DR)) {
  }
  return (int)UART_RBR;
}

/* sifive_test: 0x5555 = pass (status 0), (code << 16) | 0x3333 = fail with status `code`. */
void board_exit(int code) {
  SIFIVE_TEST = code == 0 ? 0x5555u : (((uint32_t)code << 16) | 0x3333u);
  for (;;) {
  }
}

/* mcycle (low 32 bits); under QEMU it follows host time unless -icount is given. */
uint32_t board_cycles(void) {
  unsigned long c;
  __asm__ volatile("csrr %0, mcycle" : "=r"(c));
  return (uint32_t)c;
}
