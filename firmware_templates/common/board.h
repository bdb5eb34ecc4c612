/* The board interface: everything the harnesses need from a board, nothing more. */
#ifndef EP_BOARD_H
#define EP_BOARD_H

#include <stdint.h>

void board_init(void);
void board_putc(char c);
int board_getc(void);                       /* blocking read of one byte from the host link */
void board_exit(int code) __attribute__((noreturn));
uint32_t board_stack_used(void);            /* bytes of stack touched so far (painted stack) */
uint32_t board_stack_size(void);
uint32_t board_cycles(void);                /* free-running core cycle counter; 0 where none (QEMU) */

#endif
