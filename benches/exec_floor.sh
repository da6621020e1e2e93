#!/bin/sh
# What a process start costs on this machine, before any plugin code runs: the price of one
# trapped CPUID instruction, and the median spawn+wait time of a program with no libc, a
# do-nothing static glibc program, and the given tartan-cni builds (run with no CNI variables:
# they print an error and exit). glibc's start-up runs ~60 CPUIDs (CPU feature and cache
# detection); on a VM each one exits to the hypervisor. Needs gcc; builds in a temporary
# directory it removes. Results: docs/benchmarks.md (CNI section).
# Run: sh benches/exec_floor.sh [tartan-cni binaries...]
set -eu
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT INT TERM

cat >"$TMP/cpuid.c" <<'EOF'
#include <cpuid.h>
#include <stdio.h>
#include <time.h>
int main(void) {
    unsigned a, b, c, d;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 2000; i++) __cpuid_count(4, i & 3, a, b, c, d);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("one CPUID (leaf 4): %.2f us\n",
           ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 2000 / 1000.0);
    return 0;
}
EOF
cat >"$TMP/nop.c" <<'EOF'
int main(void) { return 0; }
EOF
cat >"$TMP/nolibc.c" <<'EOF'
void _start(void) { __asm__ volatile("mov $60, %eax; xor %edi, %edi; syscall"); }
EOF
cat >"$TMP/spawn.c" <<'EOF'
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
extern char **environ;
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
int main(int argc, char **argv) {
    enum { N = 400 };
    static double t[N];
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    char *env[] = {NULL};
    for (int k = 1; k < argc; k++) {
        for (int i = 0; i < N; i++) {
            struct timespec a, b;
            pid_t pid;
            char *av[] = {argv[k], NULL};
            clock_gettime(CLOCK_MONOTONIC, &a);
            if (posix_spawn(&pid, argv[k], &fa, NULL, av, env) != 0) { perror(argv[k]); return 1; }
            waitpid(pid, NULL, 0);
            clock_gettime(CLOCK_MONOTONIC, &b);
            t[i] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
        }
        qsort(t, N, sizeof t[0], cmp);
        printf("spawn + wait, median of %d: %7.0f us  %s\n", N, t[N / 2], argv[k]);
    }
    return 0;
}
EOF
gcc -O2 -o "$TMP/cpuid" "$TMP/cpuid.c"
gcc -O2 -static -o "$TMP/static-glibc-nop" "$TMP/nop.c"
gcc -O2 -static -nostdlib -o "$TMP/no-libc-nop" "$TMP/nolibc.c"
gcc -O2 -o "$TMP/spawn" "$TMP/spawn.c"
"$TMP/cpuid"
"$TMP/spawn" "$TMP/no-libc-nop" "$TMP/static-glibc-nop" "$@"
