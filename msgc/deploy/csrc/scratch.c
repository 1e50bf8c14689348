/* Per-thread scratch that grows as needed and is kept between calls (one region per slot). */
#include <stdlib.h>

#include "internal.h"

static __thread void *regions[SCRATCH_SLOTS];
static __thread size_t sizes[SCRATCH_SLOTS];

void *msgc_scratch(int slot, size_t bytes) {
  if (bytes > sizes[slot] || !regions[slot]) {
    free(regions[slot]);
    const size_t want = bytes + bytes / 4 + 64;
    regions[slot] = malloc(want);
    sizes[slot] = regions[slot] ? want : 0;
  }
  return regions[slot];
}
