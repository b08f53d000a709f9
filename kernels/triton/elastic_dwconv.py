"""Triton kernels of the elastic depthwise convolution (installed as ``tofa_fast.triton_kernels``).

Math (the reference is :func:`tofa_fast.ops.elastic_dwconv2d_reference`; F = active filter of
channel c, k×k, padding p = k // 2, stride S):

* active filter: start from the K×K filter W_c; each transform step of target size t computes
  ``out[q] = Σ_p' E[q, p'] · cur[p']`` where ``E[q, p'] = M[q, pos(p')]`` when p' lies in the centred
  t×t window of the current grid (``pos`` its index inside the window) and 0 elsewhere, so the
  window slice is folded into the matrix load. One program handles a block of channels through the
  whole chain: one launch, whatever the chain length.
* forward: ``y[n,c,r,s] = Σ_{i,j} F[i,j] · x[n, c, rS + i − p, sS + j − p]`` (zero outside x).
* grad input: ``dx[n,c,h,w] = Σ_{i,j} F[i,j] · dy[n, c, (h + p − i)/S, (w + p − j)/S]`` over the
  (i, j) for which both quotients are exact and in range.
* grad filter: ``dF[c,i,j] = Σ_{n,r,s} dy[n,c,r,s] · x[n, c, rS + i − p, sS + j − p]``, a reduction
  over N·H_out·W_out split across programs (atomic adds into a float32/float64 buffer).
* active-filter backward: recompute the chain, then walk it back from k:
  ``dE[q, p'] = Σ_c g[c, q] · cur_prev[c, p']`` is atomically added into dM at ``pos(p')`` and
  ``g_prev[c, p'] = Σ_q g[c, q] · E[q, p']`` (zero outside the window, as the slice's gradient must be).
  The final g is the weight gradient, zero for channels ≥ C. One launch.

Strides are passed explicitly, so NCHW, channels_last and non-contiguous inputs need no copies.
Accumulation is float32 (float64 for float64 tensors). Mixed precision (a bfloat16/float16 x with
float32 weight and transforms, as under autocast): the active filter is formed from the float32
weights and kept in float32 for the convolution; weight and matrix gradients come back in the
weights' dtype, the input gradient in x's. On CPU tensors the kernels run only under
``TRITON_INTERPRET=1``, which must be set before this module is imported (``INTERPRETED`` records
which mode the kernels were decorated in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import triton
import triton.language as tl
from tofa_fast.ops.elastic_dwconv_reference import check_elastic_dwconv_args, output_memory_format
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)

MAX_TRANSFORMS = 3


@triton.jit
def _window_matrix(m_ptr, T_PREV: tl.constexpr, T: tl.constexpr, P_PREV: tl.constexpr, P: tl.constexpr):
    """E (P × P_PREV): the t²×t² matrix spread over the centred t×t window of a t_prev×t_prev grid."""
    q = tl.arange(0, P)[:, None]
    grid = tl.arange(0, P_PREV)[None, :]
    row = grid // T_PREV
    col = grid % T_PREV
    off = (T_PREV - T) // 2
    inside = (grid < T_PREV * T_PREV) & (row >= off) & (row < off + T) & (col >= off) & (col < off + T)
    pos = (row - off) * T + (col - off)
    return tl.load(m_ptr + q * (T * T) + pos, mask=inside & (q < T * T), other=0.0), inside, q * (T * T) + pos


@triton.jit
def _chain_step(
    cur, m_ptr, T_PREV: tl.constexpr, T: tl.constexpr, P_PREV: tl.constexpr, P: tl.constexpr, ACC: tl.constexpr
):
    e, _, _ = _window_matrix(m_ptr, T_PREV, T, P_PREV, P)
    return tl.sum(cur[:, None, :] * e.to(ACC)[None, :, :], axis=2)


@triton.jit
def _chain_step_backward(
    g,
    prev,
    m_ptr,
    gm_ptr,
    T_PREV: tl.constexpr,
    T: tl.constexpr,
    P_PREV: tl.constexpr,
    P: tl.constexpr,
    ACC: tl.constexpr,
    WANT_GM: tl.constexpr,
):
    e, inside, offsets = _window_matrix(m_ptr, T_PREV, T, P_PREV, P)
    if WANT_GM:
        q = tl.arange(0, P)[:, None]
        dm = tl.sum(g[:, :, None] * prev[:, None, :], axis=0)
        tl.atomic_add(gm_ptr + offsets, dm, mask=inside & (q < T * T))
    return tl.sum(g[:, :, None] * e.to(ACC)[None, :, :], axis=1)


@triton.jit
def _load_weight_rows(w_ptr, c, c_mask, K: tl.constexpr, P0: tl.constexpr, ACC: tl.constexpr):
    grid = tl.arange(0, P0)[None, :]
    return tl.load(w_ptr + c[:, None] * (K * K) + grid, mask=c_mask[:, None] & (grid < K * K), other=0.0).to(ACC)


@triton.jit
def _active_filter_kernel(
    w_ptr,
    m1_ptr,
    m2_ptr,
    m3_ptr,
    out_ptr,
    C,
    K: tl.constexpr,
    KOUT: tl.constexpr,
    NUM_T: tl.constexpr,
    T1: tl.constexpr,
    T2: tl.constexpr,
    T3: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    PK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    q = tl.arange(0, PK)[None, :]
    if NUM_T == 0:
        off = (K - KOUT) // 2
        pos = (q // KOUT + off) * K + q % KOUT + off
        cur = tl.load(w_ptr + c[:, None] * (K * K) + pos, mask=c_mask[:, None] & (q < KOUT * KOUT), other=0.0).to(ACC)
    else:
        cur = _load_weight_rows(w_ptr, c, c_mask, K, P0, ACC)
        cur = _chain_step(cur, m1_ptr, K, T1, P0, P1, ACC)
        if NUM_T >= 2:
            cur = _chain_step(cur, m2_ptr, T1, T2, P1, P2, ACC)
        if NUM_T >= 3:
            cur = _chain_step(cur, m3_ptr, T2, T3, P2, P3, ACC)
    tl.store(out_ptr + c[:, None] * (KOUT * KOUT) + q, cur, mask=c_mask[:, None] & (q < KOUT * KOUT))


@triton.jit
def _active_filter_backward_kernel(
    w_ptr,
    m1_ptr,
    m2_ptr,
    m3_ptr,
    gf_ptr,
    gw_ptr,
    gm1_ptr,
    gm2_ptr,
    gm3_ptr,
    C,
    C_MAX,
    K: tl.constexpr,
    KOUT: tl.constexpr,
    NUM_T: tl.constexpr,
    T1: tl.constexpr,
    T2: tl.constexpr,
    T3: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    PK: tl.constexpr,
    ACC: tl.constexpr,
    WANT_GW: tl.constexpr,
    WANT_GM: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    used = c < C
    grid = tl.arange(0, P0)[None, :]
    if NUM_T == 0:
        off = (K - KOUT) // 2
        row = grid // K
        col = grid % K
        inside = (grid < K * K) & (row >= off) & (row < off + KOUT) & (col >= off) & (col < off + KOUT)
        pos = (row - off) * KOUT + (col - off)
        g0 = tl.load(gf_ptr + c[:, None] * (KOUT * KOUT) + pos, mask=used[:, None] & inside, other=0.0)
    else:
        cur0 = _load_weight_rows(w_ptr, c, used, K, P0, ACC)
        cur1 = _chain_step(cur0, m1_ptr, K, T1, P0, P1, ACC)
        if NUM_T == 1:
            g1 = tl.load(
                gf_ptr + c[:, None] * (KOUT * KOUT) + tl.arange(0, P1)[None, :],
                mask=used[:, None] & (tl.arange(0, P1)[None, :] < KOUT * KOUT),
                other=0.0,
            )
        else:
            cur2 = _chain_step(cur1, m2_ptr, T1, T2, P1, P2, ACC)
            if NUM_T == 2:
                g2 = tl.load(
                    gf_ptr + c[:, None] * (KOUT * KOUT) + tl.arange(0, P2)[None, :],
                    mask=used[:, None] & (tl.arange(0, P2)[None, :] < KOUT * KOUT),
                    other=0.0,
                )
            else:
                g3 = tl.load(
                    gf_ptr + c[:, None] * (KOUT * KOUT) + tl.arange(0, P3)[None, :],
                    mask=used[:, None] & (tl.arange(0, P3)[None, :] < KOUT * KOUT),
                    other=0.0,
                )
                g2 = _chain_step_backward(g3, cur2, m3_ptr, gm3_ptr, T2, T3, P2, P3, ACC, WANT_GM)
            g1 = _chain_step_backward(g2, cur1, m2_ptr, gm2_ptr, T1, T2, P1, P2, ACC, WANT_GM)
        g0 = _chain_step_backward(g1, cur0, m1_ptr, gm1_ptr, K, T1, P0, P1, ACC, WANT_GM)
    if WANT_GW:
        tl.store(gw_ptr + c[:, None] * (K * K) + grid, g0, mask=(c < C_MAX)[:, None] & (grid < K * K))


@triton.jit
def _plane_tile(C, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr):
    """Program (n · channel blocks, plane block): sample n, channels c (BLOCK_C, 1), plane offsets (1, BLOCK)."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // c_blocks
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    return n, c, c < C, offs


@triton.jit
def _dwconv_forward_kernel(
    x_ptr,
    f_ptr,
    y_ptr,
    C,
    H,
    W,
    OH,
    OW,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, c, c_ok, offs = _plane_tile(C, BLOCK_C, BLOCK)
    mask = c_ok & (offs < OH * OW)
    oh = offs // OW
    ow = offs % OW
    x_base = x_ptr + n * sxn + c * sxc
    acc = tl.zeros([BLOCK_C, BLOCK], dtype=ACC)
    for i in tl.static_range(K):
        ih = oh * STRIDE + i - K // 2
        row_ok = mask & (ih >= 0) & (ih < H)
        for j in tl.static_range(K):
            iw = ow * STRIDE + j - K // 2
            xv = tl.load(x_base + ih * sxh + iw * sxw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
            acc += xv.to(ACC) * tl.load(f_ptr + c * (K * K) + i * K + j, mask=c_ok, other=0.0)
    tl.store(y_ptr + n * syn + c * syc + oh * syh + ow * syw, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_grad_input_kernel(
    gy_ptr,
    f_ptr,
    gx_ptr,
    C,
    H,
    W,
    OH,
    OW,
    sgn,
    sgc,
    sgh,
    sgw,
    sxn,
    sxc,
    sxh,
    sxw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, c, c_ok, offs = _plane_tile(C, BLOCK_C, BLOCK)
    mask = c_ok & (offs < H * W)
    h = offs // W
    w = offs % W
    gy_base = gy_ptr + n * sgn + c * sgc
    acc = tl.zeros([BLOCK_C, BLOCK], dtype=ACC)
    for i in tl.static_range(K):
        th = h + K // 2 - i
        oh = th // STRIDE
        row_ok = mask & (th >= 0) & (th % STRIDE == 0) & (oh < OH)
        for j in tl.static_range(K):
            tw = w + K // 2 - j
            ow = tw // STRIDE
            ok = row_ok & (tw >= 0) & (tw % STRIDE == 0) & (ow < OW)
            gv = tl.load(gy_base + oh * sgh + ow * sgw, mask=ok, other=0.0)
            acc += gv.to(ACC) * tl.load(f_ptr + c * (K * K) + i * K + j, mask=c_ok, other=0.0)
    tl.store(gx_ptr + n * sxn + c * sxc + h * sxh + w * sxw, acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dwconv_grad_filter_kernel(
    x_ptr,
    gy_ptr,
    gf_ptr,
    N,
    C,
    H,
    W,
    OH,
    OW,
    sxn,
    sxc,
    sxh,
    sxw,
    sgn,
    sgc,
    sgh,
    sgw,
    K: tl.constexpr,
    STRIDE: tl.constexpr,
    PKK: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Tile [channels, taps, reduction elements]; program (c block, s) takes every SPLIT-th block.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c3 = c[:, None, None]
    taps = tl.arange(0, PKK)
    ti = (taps // K)[None, :, None]
    tj = (taps % K)[None, :, None]
    valid = (c3 < C) & (taps < K * K)[None, :, None]
    acc = tl.zeros([BLOCK_C, PKK, BLOCK], dtype=ACC)
    total = N * OH * OW
    for start in range(tl.program_id(1) * BLOCK, total, SPLIT * BLOCK):
        e = start + tl.arange(0, BLOCK)[None, None, :]
        ok = e < total
        n = e // (OH * OW)
        rem = e % (OH * OW)
        oh = rem // OW
        ow = rem % OW
        g = tl.load(gy_ptr + n * sgn + c3 * sgc + oh * sgh + ow * sgw, mask=ok & (c3 < C), other=0.0).to(ACC)
        ih = oh * STRIDE + ti - K // 2
        iw = ow * STRIDE + tj - K // 2
        m = ok & valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_ptr + n * sxn + c3 * sxc + ih * sxh + iw * sxw, mask=m, other=0.0).to(ACC)
        acc += xv * g
    total_taps = tl.sum(acc, axis=2)
    out = gf_ptr + c[:, None] * (K * K) + taps[None, :]
    out_mask = (c[:, None] < C) & (taps[None, :] < K * K)
    if SPLIT == 1:
        tl.store(out, total_taps, mask=out_mask)
    else:
        tl.atomic_add(out, total_taps, mask=out_mask)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chain_meta(weight: torch.Tensor, kernel_size: int, transforms: list[torch.Tensor]) -> dict:
    if len(transforms) > MAX_TRANSFORMS:
        raise ValueError(f"the Triton kernels take at most {MAX_TRANSFORMS} transforms, got {len(transforms)}")
    big = weight.shape[-1]
    sizes = [round(m.shape[0] ** 0.5) for m in transforms]
    padded = sizes + [1] * (MAX_TRANSFORMS - len(sizes))
    return {
        "K": big,
        "KOUT": kernel_size,
        "NUM_T": len(sizes),
        "T1": padded[0],
        "T2": padded[1],
        "T3": padded[2],
        "P0": triton.next_power_of_2(big * big),
        "P1": triton.next_power_of_2(padded[0] ** 2),
        "P2": triton.next_power_of_2(padded[1] ** 2),
        "P3": triton.next_power_of_2(padded[2] ** 2),
        "PK": triton.next_power_of_2(kernel_size * kernel_size),
    }


def _matrix_args(transforms: list[torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    mats = [m.contiguous() for m in transforms]
    return mats + [like] * (MAX_TRANSFORMS - len(mats))  # unused slots: any valid pointer


@dataclass(frozen=True)
class Tiles:
    """Program tile sizes (powers of two), capped by the problem's own sizes.

    Compiled, one channel per conv and grad-filter program (what the GPU kernels were built
    around: coalesced along the plane for NCHW). Under the interpreter a program costs a fixed time
    per operation whatever its tile, so it takes blocks of channels and whole planes: tens of
    programs per layer instead of thousands (training a supernet through it becomes affordable).
    """

    chain_channels: int  # active-filter programs: the E tile is channels × t² × t_prev² values
    conv_channels: int  # forward / grad-input programs: channels × pixels
    conv_pixels: int
    filter_channels: int  # grad-filter programs: channels × taps × reduction elements per step
    filter_reduction: int
    filter_elements: int  # cap on that product (registers on a GPU, array size in the interpreter)

    def conv(self, channels: int, pixels: int) -> tuple[int, int]:
        return min(self.conv_channels, _pow2(channels)), min(self.conv_pixels, _pow2(pixels))

    def grad_filter(self, channels: int, taps: int, total: int) -> tuple[int, int]:
        block_c, block = min(self.filter_channels, _pow2(channels)), min(self.filter_reduction, _pow2(total))
        while block_c * taps * block > self.filter_elements and block > 16:
            block //= 2
        while block_c * taps * block > self.filter_elements and block_c > 1:
            block_c //= 2
        return block_c, block


COMPILED_TILES = Tiles(4, 1, 256, 1, 128, 1 << 15)
INTERPRETER_TILES = Tiles(32, 64, 1024, 64, 1024, 1 << 18)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _default_tiles() -> Tiles:
    return INTERPRETER_TILES if INTERPRETED else COMPILED_TILES


def active_filter(
    weight: torch.Tensor, kernel_size: int, transforms: list[torch.Tensor], channels: int, tiles: Tiles | None = None
) -> torch.Tensor:
    """(channels, k·k) active filters in the accumulation dtype, one launch."""
    block_c = (tiles or _default_tiles()).chain_channels
    weight = weight.contiguous()
    out = torch.empty((channels, kernel_size * kernel_size), dtype=_acc_torch(weight.dtype), device=weight.device)
    _active_filter_kernel[(triton.cdiv(channels, block_c),)](
        weight,
        *_matrix_args(transforms, weight),
        out,
        channels,
        **_chain_meta(weight, kernel_size, transforms),
        ACC=_acc_dtype(weight.dtype),
        BLOCK_C=block_c,
    )
    return out


def _grad_filter_split(total: int, block: int) -> int:
    # Enough programs per channel to fill a GPU; the interpreter runs programs one by one.
    return 1 if INTERPRETED else max(1, min(64, triton.cdiv(total, block * 8)))


def elastic_dwconv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int,
    transforms: list[torch.Tensor],
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """(N, C, H, W) → (N, C, H_out, W_out) in ``output_memory_format(x)``.

    ``tiles``: program tile sizes; None picks :data:`INTERPRETER_TILES` or :data:`COMPILED_TILES`
    by mode (tests pass the other one to cover it).
    """
    check_elastic_dwconv_args(x, weight, kernel_size, stride, transforms)
    tiles = tiles or _default_tiles()
    n, c, h, w = x.shape
    pad = kernel_size // 2
    oh, ow = (h + 2 * pad - kernel_size) // stride + 1, (w + 2 * pad - kernel_size) // stride + 1
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if y.numel() == 0:
        return y
    filters = active_filter(weight, kernel_size, transforms, c, tiles)
    block_c, block = tiles.conv(c, oh * ow)
    _dwconv_forward_kernel[(n * triton.cdiv(c, block_c), triton.cdiv(oh * ow, block))](
        x,
        filters,
        y,
        c,
        h,
        w,
        oh,
        ow,
        *x.stride(),
        *y.stride(),
        K=kernel_size,
        STRIDE=stride,
        ACC=_acc_dtype(x.dtype),
        BLOCK_C=block_c,
        BLOCK=block,
    )
    return y


def elastic_dwconv2d_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int,
    transforms: list[torch.Tensor],
    output_mask: list[bool],
    tiles: Tiles | None = None,
    grad_filter_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(grad_x, grad_weight (C_max, 1, K, K), grad per transform); masked-off entries are empty (0,).

    ``tiles`` as in :func:`elastic_dwconv2d_forward`. ``grad_filter_split``: programs per channel
    block of the grad-filter reduction (each takes every SPLIT-th block of N·H_out·W_out, summed by
    atomic adds); None picks 1 under the interpreter and enough to fill a GPU otherwise. Tests force
    it above 1 to run the GPU's path under the interpreter.
    """
    check_elastic_dwconv_args(x, weight, kernel_size, stride, transforms)
    tiles = tiles or _default_tiles()
    need_x, need_weight, need_transforms = output_mask
    need_transforms = need_transforms and bool(transforms)
    n, c, h, w = x.shape
    oh, ow = grad_output.shape[-2:]
    acc, acc_torch = _acc_dtype(x.dtype), _acc_torch(x.dtype)
    grad_output = grad_output.to(x.dtype)

    def empty() -> torch.Tensor:  # masked-off gradients: distinct (0,) tensors (op outputs must not alias)
        return x.new_empty((0,))

    filters = active_filter(weight, kernel_size, transforms, c, tiles)
    grad_x = empty()
    if need_x:
        grad_x = torch.empty_like(x, memory_format=output_memory_format(x))
        block_c, block = tiles.conv(c, h * w)
        _dwconv_grad_input_kernel[(n * triton.cdiv(c, block_c), triton.cdiv(h * w, block))](
            grad_output,
            filters,
            grad_x,
            c,
            h,
            w,
            oh,
            ow,
            *grad_output.stride(),
            *grad_x.stride(),
            K=kernel_size,
            STRIDE=stride,
            ACC=acc,
            BLOCK_C=block_c,
            BLOCK=block,
        )
    if not (need_weight or need_transforms):
        return grad_x, empty(), [empty() for _ in transforms]
    total = n * oh * ow
    taps = _pow2(kernel_size * kernel_size)
    block_c, block = tiles.grad_filter(c, taps, total)
    split = grad_filter_split or _grad_filter_split(total, block)
    grad_filters = (torch.zeros if split > 1 else torch.empty)(
        (c, kernel_size * kernel_size), dtype=acc_torch, device=x.device
    )
    if total > 0:
        _dwconv_grad_filter_kernel[(triton.cdiv(c, block_c), split)](
            x,
            grad_output,
            grad_filters,
            n,
            c,
            h,
            w,
            oh,
            ow,
            *x.stride(),
            *grad_output.stride(),
            K=kernel_size,
            STRIDE=stride,
            PKK=taps,
            SPLIT=split,
            ACC=acc,
            BLOCK_C=block_c,
            BLOCK=block,
        )
    else:
        grad_filters.zero_()
    c_max, big = weight.shape[0], weight.shape[-1]
    grad_weight = torch.empty((c_max, 1, big, big), dtype=weight.dtype, device=x.device) if need_weight else empty()
    sizes = [round(m.shape[0] ** 0.5) for m in transforms]
    numels = [t**4 for t in sizes]
    grad_mats_flat = torch.zeros(sum(numels) if need_transforms else 1, dtype=acc_torch, device=x.device)
    grad_mats = list(torch.split(grad_mats_flat, numels)) if need_transforms else []
    weight_c = weight.contiguous()
    _active_filter_backward_kernel[(triton.cdiv(c_max, tiles.chain_channels),)](
        weight_c,
        *_matrix_args(transforms, weight_c),
        grad_filters,
        grad_weight if need_weight else grad_filters,
        *(grad_mats + [grad_mats_flat] * (MAX_TRANSFORMS - len(grad_mats))),
        c,
        c_max,
        **_chain_meta(weight, kernel_size, transforms),
        ACC=acc,
        WANT_GW=need_weight,
        WANT_GM=need_transforms,
        BLOCK_C=tiles.chain_channels,
    )
    if need_transforms:
        # copy=True: views of one buffer would alias each other, which op outputs must not.
        grad_transforms = [g.view(t * t, t * t).to(m.dtype, copy=True) for g, t, m in zip(grad_mats, sizes, transforms)]
    else:
        grad_transforms = [empty() for _ in transforms]
    return grad_x, grad_weight, grad_transforms
