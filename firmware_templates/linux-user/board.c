/* Linux user mode (static glibc binary under qemu-<arch>; on a real board, a Linux process).
 * The "UART" is stdin/stdout; the host's test inputs arrive as a file (EP_IO_FILE) mapped at
 * EP_IO_ORIGIN, where sim_main.c reads them on every board. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "board.h"

#define STACK_PAINT 0xDEADBEEFu

static char out_buf[4096];
static size_t out_len;
static uint32_t *stack_limit, *stack_top;

static void flush_out(void) {
  for (size_t done = 0; done < out_len;) {
    ssize_t n = write(1, out_buf + done, out_len - done);
    if (n <= 0) break;
    done += (size_t)n;
  }
  out_len = 0;
}

static void put_str(const char *s) {
  while (*s) board_putc(*s++);
}

static void on_fault(int sig) {
  static const char digits[] = "0123456789";
  put_str("\nFAULT signal ");
  if (sig >= 10) board_putc(digits[sig / 10]);
  board_putc(digits[sig % 10]);
  put_str("\n");
  board_exit(126);
}

void board_init(void) {
  static const int faults[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
  for (unsigned i = 0; i < sizeof faults / sizeof faults[0]; i++) signal(faults[i], on_fault);
  const char *io = getenv("EP_IO_FILE");
  if (io) {
    int fd = open(io, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size > (off_t)EP_IO_SIZE ||
        mmap((void *)(uintptr_t)EP_IO_ORIGIN, (size_t)st.st_size, PROT_READ,
             MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED) {
      put_str("ERROR cannot map EP_IO_FILE at the io region\n");
      board_exit(2);
    }
    close(fd);
  } else {  /* no inputs: an empty io region, so the harness reports it */
    mmap((void *)(uintptr_t)EP_IO_ORIGIN, 4096, PROT_READ, MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS,
         -1, 0);
  }
  /* Paint EP_STACK_BYTES below this frame so the inference's stack high-water mark shows. */
  stack_top = (uint32_t *)__builtin_frame_address(0);
  stack_limit = stack_top - EP_STACK_BYTES / 4;
  for (volatile uint32_t *p = stack_limit; p < stack_top - 64;) *p++ = STACK_PAINT;
}

void board_putc(char c) {
  out_buf[out_len++] = c;
  if (out_len == sizeof out_buf || c == '\n') flush_out();
}

int board_getc(void) {
  unsigned char c;
  flush_out();  /* the host answers only what it has seen */
  return read(0, &c, 1) == 1 ? c : -1;
}

void board_exit(int code) {
  flush_out();
  _exit(code);
}

uint32_t board_stack_used(void) {
  const uint32_t *p = stack_limit;
  while (p < stack_top && *p == STACK_PAINT) p++;
  return (uint32_t)((uintptr_t)stack_top - (uintptr_t)p);
}

uint32_t board_stack_size(void) { return EP_STACK_BYTES; }

/* PMCCNTR_EL0 is not readable from EL0 unless the kernel allows it (QEMU user mode does not):
 * a Linux process would use perf_event_open; here 0, as the header allows. */
uint32_t board_cycles(void) { return 0; }
