"""Per-call GPU time of the decode step's small fused kernels against the torch code they replace,
in one run (ratios, not absolute claims): each op is captured in a CUDA graph (as the decode step
runs it) and replayed; the time is the mean over the replays, from CUDA events.

    python tools/kernel_timing.py            # Llama-3.1-8B shapes: 8 KV heads, head_dim 128

Ops (torch reference -> Triton):
  slots k=..     OffloadKV's slot assignment at budget 2048 (kernels/slots.py), chunk 1 and 16,
                 with 90% of the selected chunks already held (a typical reuse rate)
  pack value     a decode step's 2-bit value row with 8-bit ranges (kernels/fp8.py): the torch
                 rounding of the 9 byte pairs vs the one quantize kernel
  pack keys      a 128-token key block, the same (the flush every `residual` steps)
  rms norm, rope, silu * up, merge splits, write row, quant append: the decode step's per-layer
                 small ops (kernels/norm.py, rotary.py, swiglu.py, splits.py, dense_attn.py,
                 quant_append.py), each a node of its CUDA graph once per layer: what each fusion
                 saves per layer and step, in place of the ~2 µs a node the notes estimate

Then decode attention over one layer's cache at a 128k-token context: the FullKV kernel
(kernels/dense_attn.py) and the QuantKV kernel (kernels/quant_attn_triton.py) over a real QuantKV store
(4-bit with bfloat16 ranges and 2-bit with 8-bit ranges, each with its held tokens: the defaults),
at each BLOCK_T and split count tried, as GB/s of the bytes the kernel reads next to the
device-to-device copy rate of the same run. Goal: near the copy rate (issue 11); the best row says
which launch parameters the kernels should default to.

Last, OffloadKV's zero-copy gather (kernels/prefetch.py) of one layer's selection at budget 2048
(1968 rows per KV head, none held: what random weights give) with the overlapped copy capped to
`programs` (0 = one per 32 rows, every SM), its loop pipelined `stages` deep (1 = not), from a
host store of bfloat16 values or of 8-bit codes (`host="8bit"`): the copy alone (and its PCIe
GB/s), one layer's weight GEMVs alone (Llama-3.1-8B: Wqkv, Wo, W1|W3, W2 times one token), and
both, the copy on the side stream as the decode step issues it. hidden = (copy + GEMVs - both) /
min(copy, GEMVs): 1 when the shorter one hides entirely behind the other, 0 when they run one
after the other.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import preset  # noqa: E402
from engine.kv.quant import QuantKV, hadamard  # noqa: E402
from engine.rope import inv_frequencies, rope_cos_sin  # noqa: E402
from kernels.dense_attn import dense_decode_attention_triton, write_row_ref, write_row_triton  # noqa: E402
from kernels.fp8 import quantize_pack_fp8_ref, superscale  # noqa: E402
from kernels.norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from kernels.quant_append import quant_append_ref, quant_append_triton  # noqa: E402
from kernels.quant_attn_triton import quant_decode_attention_triton  # noqa: E402
from kernels.pack_triton import quantize_pack_triton  # noqa: E402
from kernels.prefetch import RowFetcher, gather_rows  # noqa: E402
from kernels.rotary import rope_qk_ref, rope_qk_triton  # noqa: E402
from kernels.slots import assign_slots_ref, assign_slots_triton  # noqa: E402
from kernels.splits import empty_partials, merge_splits_ref, merge_splits_triton  # noqa: E402
from kernels.swiglu import silu_mul_ref, silu_mul_triton  # noqa: E402


def graph_us(fn, replays: int) -> float:
    """Mean µs per replay of fn captured in a CUDA graph (after an eager warm-up that compiles)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture needs a side stream's warm-up first
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / replays


def slot_case(H: int, k: int, n: int, gen: torch.Generator):
    """(initial slots, new) on CUDA: new is k sorted ids of n; 90% of them already held."""
    held = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(H)])[None]  # (1, H, k)
    new = held.clone()
    n_new = k // 10
    for h in range(H):  # replace 10% of the held ids by ids not held
        outside = torch.tensor(sorted(set(range(n)) - set(held[0, h].tolist())))
        new[0, h, :n_new] = outside[torch.randperm(len(outside), generator=gen)[:n_new]]
    return held.cuda(), new.sort(-1).values.cuda()


def small_ops(H: int, D: int, replays: int, gen: torch.Generator, dev: str = "cuda", timer=graph_us) -> list[tuple]:
    """(op, "torch" / "triton", µs) rows for the decode step's per-layer small ops, Llama-3.1-8B's
    sizes (32 query heads, dim 4096, ffn 14336) with H KV heads of D channels, one token. (The
    "torch" side of quant append is the unfused sequence the engine ran before, whose quantize is
    already a Triton kernel on a GPU. dev and timer: as in attention().)"""
    args = preset("llama-3.1-8b")
    bf = dict(device=dev, dtype=torch.bfloat16)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(**bf)  # noqa: E731
    x, w = rnd(1, 1, args.dim), rnd(args.dim)
    h = rnd(1, 1, (args.n_heads + 2 * H) * D)  # the QKV projection's output, rotated in place
    cos, sin = (t[:, None, None] for t in rope_cos_sin(inv_frequencies(D, args.rope_theta, args.rope_scaling).to(dev),
                                                         torch.tensor([131071], device=dev), torch.bfloat16))
    gate_up = rnd(1, 1, 2 * args.ffn_dim)
    n_rep = args.n_heads // H
    m, l, acc = empty_partials(H, 50, n_rep, D, dev)  # noqa: E741  (50 splits: the quant kernel's on 132 SMs)
    for t in (m, l, acc):
        t.copy_(torch.rand(t.shape, generator=gen))
    kv_new = [rnd(1, H, 1, D) for _ in range(2)]
    k_buf, v_buf = (torch.zeros(1, H, 131072 + 64, D, **bf) for _ in range(2))
    pos = torch.tensor([131071], device=dev)
    # QuantKV's append at its 2-bit defaults: 8-bit ranges, values clipped, keys and values rotated
    res = [torch.zeros(1, H, 128, D, **bf) for _ in range(2)]
    codes = torch.zeros(1, H, 131072, D // 4, dtype=torch.uint8, device=dev)
    ranges = [torch.zeros(1, H, 131072, D // 32, dtype=torch.uint8, device=dev) for _ in range(2)]
    sup, rot = torch.full((1, H), 0.01, device=dev), hadamard(D).to(**bf)
    ops = [("rms norm", lambda f: f(x, w, 1e-5), rms_norm_ref, rms_norm_triton),
           ("rope q, k", lambda f: f(h, args.n_heads, H, cos, sin), rope_qk_ref, rope_qk_triton),
           ("silu * up", lambda f: f(gate_up), silu_mul_ref, silu_mul_triton),
           ("merge 50 splits", lambda f: f(m, l, acc, torch.bfloat16), merge_splits_ref, merge_splits_triton),
           ("write row", lambda f: f(k_buf, v_buf, *kv_new, pos), write_row_ref, write_row_triton),
           ("quant append", lambda f: f(pos, *kv_new, *res, codes, *ranges, 2, 32, True, sup, rot, "kv"),
            quant_append_ref, quant_append_triton)]
    return [(op, name, timer(lambda: call(fn), replays))
            for op, call, ref, tri in ops for name, fn in (("torch", ref), ("triton", tri))]


def copy_overlap(H: int, D: int, replays: int, gen: torch.Generator) -> None:
    M, k, dim, hidden = 32768, 1968, 4096, 14336
    kv = torch.randn(1, H, M, D, generator=gen).to(torch.bfloat16)
    tokens = torch.rand(1, H, M, generator=gen).topk(k, -1).indices.sort(-1).values.cuda()
    wanted = torch.ones(1, H, k, dtype=torch.bool, device="cuda")
    dst = torch.empty(1, H, 2048, D, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(n, m, device="cuda", dtype=torch.bfloat16) / 64
               for n, m in ((dim + 2 * H * D, dim), (dim, dim), (2 * hidden, dim), (dim, hidden))]
    x = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)

    def gemvs():  # one layer's weights, read once for one token (the decode step's bound)
        for w in weights:
            torch.mv(w, x[:w.shape[1]])

    t_gemv = graph_us(gemvs, replays)
    print(f"\nOne layer's copy at budget 2048 (1968 rows per KV head from pinned host memory) beside one "
          f"layer's weight GEMVs ({sum(w.numel() for w in weights) * 2 / 2**20:.0f} MiB): {t_gemv:.1f} µs alone\n")
    print("| host store | copy programs | stages | MiB | copy µs | copy GB/s | copy + GEMVs µs | hidden |\n"
          "|---|---|---|---|---|---|---|---|")
    for host, programs, stages in (("model", 0, 3), ("model", 4, 3), ("model", 8, 3), ("model", 8, 1),
                                   ("model", 16, 3), ("model", 32, 3), ("model", 32, 1), ("8bit", 0, 3),
                                   ("8bit", 8, 3)):
        f = RowFetcher(kv, kv, "cuda", programs, host, stages)
        moved = 2 * H * k * D * f.host_k.element_size()  # K and V rows as stored
        t_copy = graph_us(lambda: gather_rows(f.src_k, f.src_v, tokens, wanted, None, dst, dst, 0, programs,
                                              f.ranges, stages, f.rows_copied), replays)  # counting, as RowFetcher

        def both():
            f.fetch(tokens, wanted, None, dst, dst, 0, overlap=True)
            gemvs()
            f.wait()

        t_both = graph_us(both, replays)
        hidden_share = (t_copy + t_gemv - t_both) / min(t_copy, t_gemv)
        print(f"| {host} | {programs or 'all'} | {stages} | {moved / 2**20:.1f} | {t_copy:.1f} | "
              f"{moved / t_copy / 1e3:.1f} | "
              f"{t_both:.1f} | {hidden_share:.0%} |", flush=True)
        del f


def attention(replays: int, T: int = 131072, dev: str = "cuda", timer=graph_us) -> None:
    """One layer's decode attention at T cached tokens, Llama-3.1-8B shapes, as GB/s read.
    (dev and timer: for a run of the same code on CPU, interpreted, as a check that it runs.)"""
    args = preset("llama-3.1-8b")
    H, H_kv, D = args.n_heads, args.n_kv_heads, args.head_dim
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, H_kv, T, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    big = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    copy_gbs = 2 * big.numel() / timer(lambda: big.clone(), 20) / 1e3  # read + write
    del big
    print(f"\nDecode attention over one layer's cache, {T} tokens; device-to-device copy {copy_gbs:.0f} GB/s "
          "(bytes read + written)\n")
    print("| kernel | BLOCK_T | splits | MiB read | µs | GB/s | of copy rate |\n|---|---|---|---|---|---|---|")

    def row(name, block_t, splits, nbytes, fn):
        t = timer(fn, replays)
        print(f"| {name} | {block_t} | {splits or 'default'} | {nbytes / 2**20:.0f} | {t:.1f} | {nbytes / t / 1e3:.0f} | "
              f"{nbytes / t / 1e3 / copy_gbs:.0%} |", flush=True)

    pos = torch.tensor([T - 1], device=dev)  # the step's position: rows [0, T - 1] live
    for block_t in (32, 64):  # the defaults: 32, and 64 splits (512 programs over 8 heads)
        for splits in (64, 128):
            row("dense bf16", block_t, splits, 2 * k.numel() * 2,
                lambda: dense_decode_attention_triton(q, k, v, pos, n_splits=splits, block_t=block_t))
    for bits, scales in ((4, "model"), (2, "fp8")):
        p = QuantKV(args, 0, T + 64, dev, torch.bfloat16, bits=bits, scales=scales)
        p.prefill(k[:, :, :T - 1], v[:, :, :T - 1], torch.randn(1, H, 32, D, device=dev, dtype=torch.bfloat16))
        pos = torch.tensor([T - 1], device=dev)
        store = (p.k_codes, p.k_scale, p.k_mn, p.k_res, p.v_codes, p.v_scale, p.v_mn, p.v_res, p.k_held, p.v_held,
                 p.held_mask)
        nbytes = sum(t.numel() * t.element_size() for t in store)
        for block_t in (16, 32):
            for splits in (None, 32, 64, 128):  # None: the default (3 programs per SM: 50 splits on 132 SMs)
                row(f"quant {bits}-bit, {scales} ranges", block_t, splits, nbytes,
                    lambda: quant_decode_attention_triton(q, *store[:8], pos, p.bits, p.group, k_held=p.k_held,
                                                          v_held=p.v_held, held_mask=p.held_mask, k_sup=p.k_sup,
                                                          v_sup=p.v_sup, rot=p.rot, rotate=p.rotate,
                                                          n_splits=splits, block_t=block_t))
        del p, store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--replays", type=int, default=200)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_timing.py: error: needs a CUDA GPU")
    H, D, gen = a.kv_heads, a.head_dim, torch.Generator().manual_seed(0)
    rows = []
    for chunk in (1, 16):
        k, n = 1968 // chunk, 130992 // chunk  # budget 2048, sink 16, recent 64, a 128k prompt
        init, new = slot_case(H, k, n, gen)
        for name, fn in (("torch", assign_slots_ref), ("triton", assign_slots_triton)):
            slots = init.clone()
            rows.append((f"slots k={k} chunk {chunk}", name, graph_us(
                lambda: (slots.copy_(init), fn(slots, new, chunk)), a.replays)))
    for what, T, per_channel in (("pack value (1 token)", 1, False), ("pack keys (128 tokens)", 128, True)):
        x = torch.randn(1, H, T, D, generator=gen).to("cuda", torch.bfloat16)
        sup = superscale(torch.randn(1, H, 256, D, generator=gen).cuda())
        rows.append((what, "torch", graph_us(lambda: quantize_pack_fp8_ref(x, 2, 32, per_channel, not per_channel, sup),
                                            a.replays)))
        rows.append((what, "triton", graph_us(lambda: quantize_pack_triton(x, 2, 32, per_channel, not per_channel, sup),
                                             a.replays)))
    rows += small_ops(H, D, a.replays, gen)
    print(f"{torch.cuda.get_device_name()}, {H} KV heads, head_dim {D}, mean of {a.replays} graph replays\n")
    print("| op | torch µs | Triton µs | torch / Triton |\n|---|---|---|---|")
    for i in range(0, len(rows), 2):
        (op, _, t_ref), (_, _, t_tri) = rows[i], rows[i + 1]
        print(f"| {op} | {t_ref:.1f} | {t_tri:.1f} | {t_ref / t_tri:.1f}x |")
    attention(a.replays)
    copy_overlap(H, D, a.replays, gen)  # last: its pipelined rows are the first cp.async from pinned host memory


if __name__ == "__main__":
    main()
