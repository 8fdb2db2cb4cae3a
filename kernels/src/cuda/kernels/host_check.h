// Host-compiler stand-ins for the CUDA built-ins the kernels use: lets g++ check the kernel
// sources' syntax and types where NVRTC is not available (no GPU machine). Not executable as
// is; with FARSIGHT_EMULATE the including file supplies threads, barriers, votes and atomics
// (kernels/tests/emulate/) and single-block kernels run on the CPU.
#include <cmath>
#include <cstddef>
#define __device__
#define __global__
#define __host__
#ifndef FARSIGHT_EMULATE
#define __shared__
#endif
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __align__(n) __attribute__((aligned(n)))
#define asm(...) ((void)0)
#define volatile
#ifndef FARSIGHT_EMULATE
struct dim3_t { unsigned x, y, z; };
extern dim3_t threadIdx, blockIdx, blockDim, gridDim;
inline void __syncthreads() {}
inline unsigned __ballot_sync(unsigned, int) { return 0; }
inline int __popc(unsigned) { return 0; }
template <typename T> T atomicAdd(T* p, T v) { return *p += v; }
#endif
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct int4 { int x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline void __syncwarp(unsigned = 0xffffffffu) {}
inline void __threadfence() {}
template <typename T> T __shfl_xor_sync(unsigned, T v, int, int = 32) { return v; }
template <typename T> T __shfl_up_sync(unsigned, T v, unsigned, int = 32) { return v; }
template <typename T> T __shfl_sync(unsigned, T v, int, int = 32) { return v; }
template <typename T> unsigned __match_any_sync(unsigned, T) { return 0; }
inline unsigned __reduce_add_sync(unsigned, unsigned v) { return v; }
inline int __ffs(int) { return 0; }
inline unsigned __byte_perm(unsigned, unsigned, unsigned) { return 0; }
inline float __uint_as_float(unsigned) { return 0; }
inline float __int_as_float(int) { return 0; }
inline unsigned __float_as_uint(float) { return 0; }
inline unsigned long long __float2ull_rn(float) { return 0; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
template <typename T> T __ldcg(const T* p) { return *p; }
inline unsigned __cvta_generic_to_shared(const void*) { return 0; }
template <typename T> T atomicExch(T* p, T v) { return *p = v; }
template <typename T> T atomicMax(T* p, T v) { return *p; }
template <typename T> T atomicMin(T* p, T v) { return *p; }
template <typename T> T atomicCAS(T* p, T, T v) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return a < b ? a : b; }
inline float max(float a, float b) { return a > b ? a : b; }
inline void sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
using ::expf; using ::exp2f; using ::fmaxf; using ::fminf; using ::sqrtf; using ::logf; using ::fabsf;
