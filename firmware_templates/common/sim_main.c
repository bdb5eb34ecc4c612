/* simulate's harness: run every test input the host preloaded at EP_IO_ORIGIN and print outputs.
 *
 * Input block (little endian): magic "EPIN", count, bytes per sample, 4 reserved bytes, then
 * `count` samples of `bytes per sample`. Output lines: "EP-SIM <count>", then per sample
 * "OUT <i> <rc> <hex bytes>", then "STACK <used> <size>" and "DONE"; exit status 0.
 * The first inference is bracketed by ep_bench_start/stop and every kernel ends with
 * ep_layer_mark(k), so the host can count its instructions exactly.
 */
#include <stdint.h>

#include "board.h"
#include "ep_glue.h"
#include "markers.h"

struct ep_io_header {
  uint32_t magic, count, sample_bytes, reserved;
};

static uint8_t outputs[EP_OUT_BYTES] __attribute__((aligned(16)));
static int measuring;

void ep_layer_hook(int layer) {
  if (measuring) ep_layer_mark(layer);
}

static void put_str(const char *s) {
  while (*s) board_putc(*s++);
}

static void put_dec(uint32_t v) {
  char buf[11];
  int i = 0;
  do { buf[i++] = (char)('0' + v % 10); v /= 10; } while (v);
  while (i) board_putc(buf[--i]);
}

static void put_hex_bytes(const uint8_t *p, uint32_t n) {
  static const char digits[] = "0123456789abcdef";
  for (uint32_t i = 0; i < n; i++) {
    board_putc(digits[p[i] >> 4]);
    board_putc(digits[p[i] & 15]);
  }
}

int main(void) {
  board_init();
  const struct ep_io_header *h = (const struct ep_io_header *)EP_IO_ORIGIN;
  if (h->magic != 0x4e495045u /* "EPIN" */ || h->sample_bytes != EP_IN_BYTES) {
    put_str("ERROR no input block for this model at the io region\n");
    return 2;
  }
  put_str("EP-SIM ");
  put_dec(h->count);
  board_putc('\n');
  const uint8_t *in = (const uint8_t *)(h + 1);
  for (uint32_t i = 0; i < h->count; i++) {
    measuring = (i == 0);
    if (measuring) ep_bench_start();
    int rc = ep_model_run(in + i * EP_IN_BYTES, outputs);
    if (measuring) ep_bench_stop();
    put_str("OUT ");
    put_dec(i);
    board_putc(' ');
    put_dec((uint32_t)(rc < 0 ? -rc : rc));
    board_putc(' ');
    put_hex_bytes(outputs, EP_OUT_BYTES);
    board_putc('\n');
  }
  put_str("STACK ");
  put_dec(board_stack_used());
  board_putc(' ');
  put_dec(board_stack_size());
  put_str("\nDONE\n");
  return 0;
}
