// The service's self-test family.
//
// axpy<T>:  y[i] = a * x[i] + y[i] over n elements, T a template argument (name expression),
//           JK_UNROLL a -D macro: each thread handles JK_UNROLL elements, grid-stride.
// probe:    writes every scalar argument back as double (and the u64 bit pattern), so a test
//           can check each C type arrived exactly; probe_packed takes the same fields as one
//           struct by value.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef JK_UNROLL
#define JK_UNROLL 1
#endif

namespace jk_selftest {

// NVRTC has no <stdint.h> without the toolkit's libc++ headers; spell the widths out.
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned char uint8_t;

template <typename T>
__global__ void axpy(T* __restrict__ y, const T* __restrict__ x, float a, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long base = (long long)blockIdx.x * blockDim.x + threadIdx.x; base < n;
         base += stride * JK_UNROLL) {
#pragma unroll
        for (int u = 0; u < JK_UNROLL; ++u) {
            long long i = base + u * stride;
            if (i < n) y[i] = T(a * float(x[i]) + float(y[i]));
        }
    }
}

struct ProbeArgs {
    double* out;
    int32_t a_i32;
    uint32_t a_u32;
    int64_t a_i64;
    uint64_t a_u64;
    float a_f32;
    double a_f64;
    uint8_t a_u8;
};

__device__ void write_probe(const ProbeArgs& p) {
    p.out[0] = (double)p.a_i32;
    p.out[1] = (double)p.a_u32;
    p.out[2] = (double)p.a_i64;
    p.out[3] = (double)p.a_u64;
    p.out[4] = (double)p.a_f32;
    p.out[5] = p.a_f64;
    p.out[6] = (double)p.a_u8;
    reinterpret_cast<uint64_t*>(p.out)[7] = p.a_u64;  // exact 64-bit pattern
}

__global__ void probe(double* out, int32_t a_i32, uint32_t a_u32, int64_t a_i64, uint64_t a_u64,
                      float a_f32, double a_f64, uint8_t a_u8) {
    if (threadIdx.x == 0 && blockIdx.x == 0)
        write_probe(ProbeArgs{out, a_i32, a_u32, a_i64, a_u64, a_f32, a_f64, a_u8});
}

__global__ void probe_packed(const ProbeArgs p) {
    if (threadIdx.x == 0 && blockIdx.x == 0) write_probe(p);
}

}  // namespace jk_selftest
