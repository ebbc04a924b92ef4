/*
 * The floor of a local compare: pread SRC's data extents (SEEK_DATA/SEEK_HOLE) and the same
 * bytes of DST in 1 MiB pieces, memcmp them; one thread. The third argument puts both
 * buffers that many bytes past a page (16 is where malloc puts a 1 MiB buffer), which shows
 * what alignment costs the kernel's copy from the page cache (docs/performance.md,
 * "Page-aligned buffers").
 *
 *   gcc -O2 -o /tmp/read-compare bench/floors/read-compare.c
 *   /tmp/read-compare SRC DST [offset]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PIECE (1 << 20)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s SRC DST [offset]\n", argv[0]);
    return 2;
  }
  int a = open(argv[1], O_RDONLY), b = open(argv[2], O_RDONLY);
  if (a < 0 || b < 0) {
    perror("open");
    return 1;
  }
  size_t offset = argc > 3 ? strtoul(argv[3], NULL, 10) : 0;
  char *x = (char *)aligned_alloc(4096, PIECE + 4096) + offset;
  char *y = (char *)aligned_alloc(4096, PIECE + 4096) + offset;
  double t0 = now();
  long differing = 0, total = 0;
  off_t end = lseek(a, 0, SEEK_END);
  for (off_t o = 0; o < end;) {
    off_t data = lseek(a, o, SEEK_DATA);
    if (data < 0) break;
    off_t hole = lseek(a, data, SEEK_HOLE);
    for (off_t p = data; p < hole; p += PIECE) {
      size_t n = hole - p < PIECE ? (size_t)(hole - p) : PIECE;
      if (pread(a, x, n, p) != (ssize_t)n || pread(b, y, n, p) != (ssize_t)n) {
        perror("pread");
        return 1;
      }
      total += n;
      if (memcmp(x, y, n) != 0) differing++;
    }
    o = hole;
  }
  printf("%.1f ms, %ld bytes compared, %ld pieces differ\n", (now() - t0) * 1000, total, differing);
  return 0;
}
