/* profile's harness: a framed binary request/response protocol over the board's UART.
 *
 * Frame (both directions): 0xA5, type, seq, length (u16 LE), payload, CRC-16/CCITT-FALSE (u16 LE,
 * poly 0x1021, init 0xFFFF) over type..payload. A response has the request's type | 0x80 and its
 * seq; an error is type 0xFF (u8 code, text). A request whose bytes equal the previous one (a
 * host retry) gets the cached response again, so retries never run the model twice. At boot the
 * firmware sends one BOOT frame (type 0x7E), so the host can tell a reset. The host side and the
 * command list live in edgeprune/protocol.py and edgeprune/profile.py; keep them in step and bump
 * EP_PROTO_VERSION on any change.
 *
 * Counting: every inference is bracketed by ep_bench_start/stop and each kernel ends with
 * ep_layer_mark(k) (QEMU's plugin counts instructions there); board_cycles() deltas per layer are
 * kept for boards with a cycle counter.
 */
#include <stdint.h>
#include <string.h>

#include "board.h"
#include "ep_glue.h"
#include "markers.h"

#ifndef EP_PROTO_VERSION
#define EP_PROTO_VERSION 1
#endif
#ifndef EP_MODEL_HASH
#error "EP_MODEL_HASH must come from the host (edgeprune/profile.py)"
#endif
#define EP_MAX_PAYLOAD 512u
#define EP_START 0xA5u

enum { CMD_HELLO = 0x01, CMD_LAYER_NAME, CMD_UPLOAD, CMD_RUN, CMD_READ_OUTPUT, CMD_READ_LAYERS,
       CMD_STACK, CMD_BYE, MSG_BOOT = 0x7E, MSG_ERROR = 0xFF };
enum { ERR_CRC = 1, ERR_LENGTH, ERR_COMMAND, ERR_ARGS };

extern const char *const EP_LAYER_NAMES[EP_NUM_LAYERS];

static uint8_t input[EP_IN_BYTES] __attribute__((aligned(16)));
static uint8_t outputs[EP_OUT_BYTES] __attribute__((aligned(16)));
static uint32_t layer_cycles[EP_NUM_LAYERS];
static uint32_t layer_t0;

static uint8_t req[EP_MAX_PAYLOAD];
static uint8_t resp[EP_MAX_PAYLOAD];
static uint8_t resp_type, resp_seq;
static uint16_t resp_len;
static uint16_t last_req_crc;
static int have_last;

void ep_layer_hook(int layer) {
  uint32_t now = board_cycles();
  layer_cycles[layer] = now - layer_t0;
  layer_t0 = now;
  ep_layer_mark(layer);
}

static uint16_t crc16(uint16_t crc, const uint8_t *p, uint32_t n) {
  while (n--) {
    crc ^= (uint16_t)(*p++ << 8);
    for (int i = 0; i < 8; i++) crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
  }
  return crc;
}

static void put_u16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put_u32(uint8_t *p, uint32_t v) { put_u16(p, v); put_u16(p + 2, v >> 16); }
static uint32_t get_u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static uint32_t get_u32(const uint8_t *p) { return get_u16(p) | (get_u16(p + 2) << 16); }

static void send_frame(uint8_t type, uint8_t seq, const uint8_t *payload, uint16_t len) {
  uint8_t head[4] = {type, seq, (uint8_t)len, (uint8_t)(len >> 8)};
  uint16_t crc = crc16(crc16(0xFFFFu, head, 4), payload, len);
  board_putc((char)EP_START);
  for (int i = 0; i < 4; i++) board_putc((char)head[i]);
  for (uint16_t i = 0; i < len; i++) board_putc((char)payload[i]);
  board_putc((char)(crc & 0xFF));
  board_putc((char)(crc >> 8));
}

static void send_error(uint8_t seq, uint8_t code, const char *text) {
  uint8_t buf[64];
  uint16_t n = 1;
  buf[0] = code;
  while (*text && n < sizeof buf) buf[n++] = (uint8_t)*text++;
  send_frame(MSG_ERROR, seq, buf, n);
}

/* Build the response to one well-formed request into resp/resp_len (0 = ok, else an error). */
static int handle(uint8_t type, const uint8_t *p, uint32_t n, const char **err) {
  resp_len = 0;
  switch (type) {
    case CMD_HELLO:
      memcpy(resp, "EPPF", 4);
      put_u16(resp + 4, EP_PROTO_VERSION);
      put_u16(resp + 6, EP_NUM_LAYERS);
      put_u32(resp + 8, EP_MODEL_HASH);
      put_u32(resp + 12, EP_ARENA_BYTES);
      put_u32(resp + 16, EP_IN_BYTES);
      put_u32(resp + 20, EP_OUT_BYTES);
      put_u32(resp + 24, board_stack_size());
      resp_len = 28;
      return 0;
    case CMD_LAYER_NAME: {
      if (n != 2 || get_u16(p) >= EP_NUM_LAYERS) return *err = "layer index", ERR_ARGS;
      const char *s = EP_LAYER_NAMES[get_u16(p)];
      put_u16(resp, get_u16(p));
      resp_len = 2;
      while (*s && resp_len < EP_MAX_PAYLOAD) resp[resp_len++] = (uint8_t)*s++;
      return 0;
    }
    case CMD_UPLOAD: {
      if (n < 4) return *err = "upload header", ERR_ARGS;
      uint32_t off = get_u32(p), len = n - 4;
      if (off > EP_IN_BYTES || len > EP_IN_BYTES - off) return *err = "upload past the input", ERR_ARGS;
      memcpy(input + off, p + 4, len);
      put_u32(resp, off);
      put_u32(resp + 4, len);
      resp_len = 8;
      return 0;
    }
    case CMD_RUN: {
      if (n != 4 || get_u32(p) == 0) return *err = "run count", ERR_ARGS;
      uint32_t count = get_u32(p), done = 0, total = 0;
      int rc = 0;
      while (done < count && rc == 0) {
        ep_bench_start();
        uint32_t t0 = board_cycles();
        layer_t0 = t0;
        rc = ep_model_run(input, outputs);
        total = board_cycles() - t0;
        ep_bench_stop();
        done++;
      }
      put_u32(resp, (uint32_t)rc);
      put_u32(resp + 4, done);
      put_u32(resp + 8, total);
      resp_len = 12;
      return 0;
    }
    case CMD_READ_OUTPUT: {
      if (n != 6) return *err = "read header", ERR_ARGS;
      uint32_t off = get_u32(p), len = get_u16(p + 4);
      if (off > EP_OUT_BYTES || len > EP_OUT_BYTES - off || len > EP_MAX_PAYLOAD)
        return *err = "read past the output", ERR_ARGS;
      memcpy(resp, outputs + off, len);
      resp_len = (uint16_t)len;
      return 0;
    }
    case CMD_READ_LAYERS: {
      if (n != 4) return *err = "layers header", ERR_ARGS;
      uint32_t first = get_u16(p), count = get_u16(p + 2);
      if (first > EP_NUM_LAYERS || count > EP_NUM_LAYERS - first || count * 4 > EP_MAX_PAYLOAD)
        return *err = "layer range", ERR_ARGS;
      for (uint32_t i = 0; i < count; i++) put_u32(resp + 4 * i, layer_cycles[first + i]);
      resp_len = (uint16_t)(count * 4);
      return 0;
    }
    case CMD_STACK:
      put_u32(resp, board_stack_used());
      put_u32(resp + 4, board_stack_size());
      resp_len = 8;
      return 0;
    case CMD_BYE:
      return 0;
    default:
      return *err = "unknown command", ERR_COMMAND;
  }
}

static int read_byte(void) { return board_getc() & 0xFF; }

int main(void) {
  board_init();
  send_frame(MSG_BOOT, 0, (const uint8_t *)"EPPF", 4);
  for (;;) {
    if (read_byte() != EP_START) continue; /* hunt for a start byte: skips garbage */
    uint8_t head[4];
    for (int i = 0; i < 4; i++) head[i] = (uint8_t)read_byte();
    uint32_t len = get_u16(head + 2);
    if (len > EP_MAX_PAYLOAD) {
      send_error(head[1], ERR_LENGTH, "frame too long");
      continue;
    }
    for (uint32_t i = 0; i < len; i++) req[i] = (uint8_t)read_byte();
    uint16_t got = (uint16_t)read_byte();
    got |= (uint16_t)(read_byte() << 8);
    uint16_t crc = crc16(crc16(0xFFFFu, head, 4), req, len);
    if (crc != got) {
      send_error(head[1], ERR_CRC, "bad crc");
      continue;
    }
    if (!(have_last && crc == last_req_crc && resp_seq == head[1])) {
      const char *err = "";
      int code = handle(head[0], req, len, &err);
      if (code) {
        have_last = 0;
        send_error(head[1], (uint8_t)code, err);
        continue;
      }
      resp_type = (uint8_t)(head[0] | 0x80u);
      resp_seq = head[1];
      last_req_crc = crc;
      have_last = 1;
    }
    send_frame(resp_type, resp_seq, resp, resp_len);
    if (head[0] == CMD_BYE) board_exit(len ? req[0] : 0);
  }
}
