// Random fills for synthetic models: element i = scale * u, u uniform in [-1, 1) from a
// counter-based SplitMix64 stream (backend::random_value; the same bits as the CPU backend).
// `mixed_seed` is splitmix64(seed), computed on the host.

__device__ __forceinline__ unsigned long long splitmix64_d(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void random_fill(T* out, long long n, unsigned long long mixed_seed, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z =
            splitmix64_d(mixed_seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull);
        float u = __fmul_rn((float)(unsigned int)(z >> 40), 1.0f / 16777216.0f);
        u = __fadd_rn(__fmul_rn(u, 2.0f), -1.0f);
        out[i] = from_f32<T>(__fmul_rn(u, scale));
    }
}
extern "C" __global__ void random_f32(float* o, long long n, unsigned long long s, float sc) { random_fill(o, n, s, sc); }
extern "C" __global__ void random_f16(f16_t* o, long long n, unsigned long long s, float sc) { random_fill(o, n, s, sc); }
extern "C" __global__ void random_bf16(bf16_t* o, long long n, unsigned long long s, float sc) { random_fill(o, n, s, sc); }
