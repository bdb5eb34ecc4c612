#ifndef EP_MARKERS_H
#define EP_MARKERS_H
void ep_bench_start(void);
void ep_bench_stop(void);
void ep_layer_mark(int layer);
#endif
