"""Probe: how fast can one CTA per (sequence, KV head) stream a paged K/V cache into shared memory?

A load-only kernel shaped like spec_dec_attention's memory-bound tiles (128 threads, 64-position
stages, a page-table lookup per tile, the next tile issued after a CTA barrier), with two ways
to copy a stage:

  cp.async  16-byte copies, one per thread and row chunk (the attention kernel's loader)
  TMA       one cp.async.bulk.tensor per K and per V tile (a tensor map per cache, a 3-D view
            whose box is one page of one head), completing on a per-stage mbarrier

Shared rows are either dense (the head dim's bytes) or padded by 16 bytes as the attention
kernel's ldmatrix layout wants; the TMA box then reaches 8 elements past the head dim, which
the unit fills with zeros (out of the tensor's bounds), so no global bytes are added.

    python benchmarks/kv_load_probe.py

Prints us and percent of the read bandwidth (a torch sum of 2 GiB) per variant, for the
16/16/64 and 32/8/128 decode caches at 8k, batch 64, both layouts.
"""

from __future__ import annotations

import os
import sys

import cupy
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_timing import event_median_ms, warm_up  # noqa: E402  (this directory)
from jitkern.ops.tensor_map import (L2_PROMOTION_128B, L2_PROMOTION_256B,  # noqa: E402
                                    L2_PROMOTION_NONE, SWIZZLE_NONE, encode_tiled)
from spec_dec_attention import read_bandwidth  # noqa: E402  (the benchmark's own ceiling)

SRC = r"""
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ u32 sa(const void* p) { return (u32)__cvta_generic_to_shared(p); }

extern "C" __global__ void __launch_bounds__(128) loadkv(
        const unsigned char* __restrict__ kc, const unsigned char* __restrict__ vc,
        const int* __restrict__ bt, int pages, int hkv, const void* tmk, const void* tmv,
        float* sink) {
    extern __shared__ __align__(1024) unsigned char sm[];
    __shared__ __align__(8) u64 bar[STAGES];
    constexpr int TILEB = 64 * PADB;          // one K (or V) stage in shared memory
    constexpr int CPR = DB / 16;              // 16-byte chunks of a row in memory
    const int hk = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int* btb = bt + (size_t)b * pages;
    if (TMA && tid == 0) {
        for (int s = 0; s < STAGES; ++s)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sa(&bar[s])));
        asm volatile("fence.mbarrier_init.release.cluster;");
    }
    __syncthreads();
    auto issue = [&](int t, int s) {
        unsigned char* ks = sm + s * 2 * TILEB;
        unsigned char* vs = ks + TILEB;
        const int page = __ldg(btb + t);
#if TMA
        if (tid == 0) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                         :: "r"(sa(&bar[s])), "r"(2 * TILEB) : "memory");
#if HND
            const int c1 = 0, c2 = page * hkv + hk;
#else
            const int c1 = hk, c2 = page * 64;
#endif
            asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                         " [%0], [%1, {%2, %3, %4}], [%5];"
                         :: "r"(sa(ks)), "l"(tmk), "r"(0), "r"(c1), "r"(c2), "r"(sa(&bar[s]))
                         : "memory");
            asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                         " [%0], [%1, {%2, %3, %4}], [%5];"
                         :: "r"(sa(vs)), "l"(tmv), "r"(0), "r"(c1), "r"(c2), "r"(sa(&bar[s]))
                         : "memory");
        }
#else
        for (int i = tid; i < 64 * CPR; i += 128) {
            const int r = i / CPR, c = i % CPR;
#if HND
            const size_t src = (((size_t)page * hkv + hk) * 64 + r) * DB + c * 16;
#else
            const size_t src = (((size_t)page * 64 + r) * hkv + hk) * DB + c * 16;
#endif
            asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;"
                         :: "r"(sa(ks + r * PADB + c * 16)), "l"(kc + src) : "memory");
            asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;"
                         :: "r"(sa(vs + r * PADB + c * 16)), "l"(vc + src) : "memory");
        }
#endif
    };
    float acc = 0.f;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < pages) issue(s, s);
        asm volatile("cp.async.commit_group;");
    }
    for (int t = 0; t < pages; ++t) {
        const int s = t % STAGES;
#if TMA
        const u32 parity = (t / STAGES) & 1;
        u32 done = 0;
        while (!done)
            asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;"
                         " selp.u32 %0, 1, 0, p; }"
                         : "=r"(done) : "r"(sa(&bar[s])), "r"(parity) : "memory");
#else
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
#endif
        __syncthreads();
        const unsigned char* ks = sm + s * 2 * TILEB;
        acc += __int_as_float(*(const int*)(ks + (tid * 68) % TILEB)) +
               __int_as_float(*(const int*)(ks + TILEB + (tid * 68) % TILEB));
        if (t + STAGES - 1 < pages) issue(t + STAGES - 1, (t + STAGES - 1) % STAGES);
        asm volatile("cp.async.commit_group;");
    }
    if (acc == 12345.f) sink[0] = acc;   // keeps the shared reads
}
"""

def encode(t: torch.Tensor, layout: str, hkv: int, d: int, pad_elems: int, promo: int) -> bytes:
    """The CUtensorMap of a [pages, 64, hkv, d] (NHD) or [pages, hkv, 64, d] (HND) 16-bit cache
    for this probe: a box of one page of one head, ``d + pad_elems`` wide, no swizzle (the probe
    only counts bytes; the op's maps are jitkern.ops.tensor_map.paged_kv_map)."""
    pages = t.shape[0]
    if layout == "NHD":
        dims, strides, box = (d, hkv, pages * 64), (d * 2, hkv * d * 2), (d + pad_elems, 1, 64)
    else:
        dims, strides, box = (d, 64, pages * hkv), (d * 2, 64 * d * 2), (d + pad_elems, 64, 1)
    return encode_tiled(t.data_ptr(), dims, strides, box, SWIZZLE_NONE, promo)


def time_us(fn, reps=20, rounds=5):
    """The best of ``rounds`` CUDA-event medians of ``reps`` calls, after a warm-up."""
    warm_up(fn)
    return min(event_median_ms(fn, reps) for _ in range(rounds)) * 1e3


def main():
    print(f"# kv_load_probe on {torch.cuda.get_device_name()}")
    rbw = read_bandwidth()
    print(f"# read bandwidth (sum of 2 GiB) {rbw / 1e12:.2f} TB/s")
    print("| cache | variant | us | % read |\n|---|---|---|---|")
    for hkv, d in ((16, 64), (8, 128)):
        batch, pages = 64, 128
        for layout in ("NHD", "HND"):
            shape = (batch * pages, 64, hkv, d) if layout == "NHD" else (batch * pages, hkv, 64, d)
            k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
            v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
            bt = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
            sink = torch.zeros(1, device="cuda")
            nbytes = 2 * k.numel() * 2
            stages = 5 if d == 64 else 3
            for name, tma, padb, promo, st in (
                    ("cp.async, padded rows", 0, d * 2 + 16, 0, stages),
                    ("TMA, dense rows, L2 128B", 1, d * 2, L2_PROMOTION_128B, stages),
                    ("TMA, padded rows (zero-filled box), L2 128B", 1, d * 2 + 16,
                     L2_PROMOTION_128B, stages),
                    ("TMA, padded rows, L2 256B", 1, d * 2 + 16, L2_PROMOTION_256B, stages),
                    ("TMA, padded rows, no L2 promotion", 1, d * 2 + 16, L2_PROMOTION_NONE,
                     stages),
                    ("TMA, padded rows, 4 stages", 1, d * 2 + 16, L2_PROMOTION_128B, 4),
                    ("TMA, padded rows, 8 stages", 1, d * 2 + 16, L2_PROMOTION_128B, 8)):
                if st * 2 * 64 * padb > 110 * 1024:
                    continue
                opts = ("-std=c++17", f"-DSTAGES={st}", f"-DPADB={padb}", f"-DDB={d * 2}",
                        f"-DTMA={tma}", f"-DHND={int(layout == 'HND')}", "-arch=sm_90a")
                fn = cupy.RawKernel(SRC, "loadkv", options=opts)
                smem = st * 2 * 64 * padb
                fn.max_dynamic_shared_size_bytes = smem
                pad = (padb - d * 2) // 2
                try:
                    tmk = torch.frombuffer(bytearray(encode(k, layout, hkv, d, pad, promo)),
                                           dtype=torch.uint8).cuda()
                    tmv = torch.frombuffer(bytearray(encode(v, layout, hkv, d, pad, promo)),
                                           dtype=torch.uint8).cuda()
                except RuntimeError as e:
                    print(f"| {hkv}/{d} {layout} | {name} | {e} | |")
                    continue
                assert tmk.data_ptr() % 64 == 0 and tmv.data_ptr() % 64 == 0
                args = (cupy.uint64(k.data_ptr()), cupy.uint64(v.data_ptr()),
                        cupy.uint64(bt.data_ptr()), cupy.int32(pages), cupy.int32(hkv),
                        cupy.uint64(tmk.data_ptr()), cupy.uint64(tmv.data_ptr()),
                        cupy.uint64(sink.data_ptr()))
                stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

                def run():
                    with stream:
                        fn((hkv, batch), (128,), args, shared_mem=smem)
                us = time_us(run)
                print(f"| {hkv}/{d} {layout} 8k b64 | {name} ({st} stages, "
                      f"{smem // 1024} KB) | {us:.1f} | {100 * nbytes / (us * 1e-6) / rbw:.1f}% |",
                      flush=True)
            del k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
