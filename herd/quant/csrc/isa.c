/* Which of herd's instruction sets this CPU can run: native.py asks before it loads a library built
 * for one (a library built for AVX-512 would die of an illegal instruction on an AVX2 CPU). Built
 * alone with no vector flags as the probe, and into every library. The numbers are native.py's
 * ISA_CODES: 0 generic, 1 AVX2 with FMA and F16C, 2 AVX-512 F/BW/VL with VNNI. */
#include "kernels.h"

int herd_cpu_has(int isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init(); /* the checks below include the OS's support for the wider registers */
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return isa == 0 || (isa == 1 && avx2) || (isa == 2 && avx2 && avx512);
#else
    return isa == 0;
#endif
}
