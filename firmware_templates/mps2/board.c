/* Arm MPS2/MPS3 boards in QEMU: CMSDK APB UART0 and semihosting exit. */
#include <stdint.h>

#include "board.h"

#ifndef EP_UART_BASE
#error "EP_UART_BASE must come from the target file ([qemu] uart_base)"
#endif

#define UART_DATA (*(volatile uint32_t *)(EP_UART_BASE + 0x00))
#define UART_STATE (*(volatile uint32_t *)(EP_UART_BASE + 0x04))
#define UART_CTRL (*(volatile uint32_t *)(EP_UART_BASE + 0x08))
#define UART_BAUDDIV (*(volatile uint32_t *)(EP_UART_BASE + 0x10))

void board_init(void) {
  UART_BAUDDIV = 16;
  UART_CTRL = 3; /* TX and RX enabled */
  /* QEMU's UART refused bytes while RX was off and looks again only when DATA is read (or
     after about a second): read it once so the host's first request arrives at once. */
  (void)UART_DATA;
  *(volatile uint32_t *)0xE000EDFCu |= 1u << 24; /* DEMCR.TRCENA: DWT on */
  *(volatile uint32_t *)0xE0001000u |= 1u;       /* DWT_CTRL.CYCCNTENA */
}

void board_putc(char c) {
  while (UART_STATE & 1u) {
  }
  UART_DATA = (uint8_t)c;
}

int board_getc(void) {
  while (!(UART_STATE & 2u)) {
  }
  return (int)(UART_DATA & 0xFFu);
}

/* DWT CYCCNT (Cortex-M3/M4/M7/M33/M55; started in board_init). QEMU does not model it: reads 0. */
uint32_t board_cycles(void) { return *(volatile uint32_t *)0xE0001004u; }

/* Semihosting SYS_EXIT_EXTENDED: QEMU exits with `code` as its status. */
void board_exit(int code) {
  uint32_t block[2] = {0x20026u /* ADP_Stopped_ApplicationExit */, (uint32_t)code};
  register uint32_t r0 __asm__("r0") = 0x20u;
  register uint32_t *r1 __asm__("r1") = block;
  __asm__ volatile("bkpt 0xab" : : "r"(r0), "r"(r1) : "memory");
  for (;;) {
  }
}
