"""Fused short-run Langevin as one Triton kernel launch per chain (CUDA; TRITON_INTERPRET=1 runs it on CPU).

    z <- z + (s^2 / 2) * (grad_z f(z) + score_p0(z)) + s * eps,   K steps,   score = -sign(z)/b | -z/b^2
    a_1 = W_1 z + b_1,  a_l = W_l act(a_{l-1}) + b_l,  f = w_out . act(a_L) + b_out
    g_L = w_out * act'(a_L),  g_{l-1} = (W_l^T g_l) * act'(a_{l-1}),  grad_z f = W_1^T g_1

Two kernels, one launch per chain. The resident kernel (MLPs of <= 2 hidden layers of <= 256, d <= 64) loads
W_1, W_2, the biases and its rows of z once and keeps them, and every a_l and g_l, on chip for the K steps:
per step it reads only the given noise (4 BLOCK_B d bytes) and writes nothing but the energies ("on chip":
register tiles the compiler stages through shared memory for the dots; ``kernel='auto'`` plans it by
:func:`resident_shared_bytes` against the device's shared memory, in bf16 weights when only that fits, and
where the compiler still refuses (OutOfResources) falls back to streaming, with a warning). The streaming
kernel (any supported MLP) tiles the layers as described next. Each program owns BLOCK_B rows of z for the
whole chain; per step it runs the MLP forward, the analytic backward, the score and the update, with eps
read from a [K, B, d] tensor or drawn in-kernel by Philox
(key = seed, counter = (row * d + col, step)). Per step, per row: matmul FLOPs 4(dH + (L-1)H^2) (+2H for
the energy). Per step, per program: weight bytes 8(dH + (L-1)H^2) in fp32, half in bf16 (every program reads
the same weights: L2-resident); row scratch a_l, g_l: written once, read H / BLOCK_H times (L1-resident);
z: 8 BLOCK_B d, plus 4 BLOCK_B d of given noise.

Dots: exact fp32 (``precision='ieee'``), TF32 or bf16 operands, fp32 accumulation in every case.
Layouts (all contiguous): z [B, d] fp32 (z_0 in, z_K out); w_in [H, d]; w_hid [max(L-1, 1), H, H] (W_2..W_L
stacked, a dummy when L = 1); w_in/w_hid fp32 or bf16 (bf16: dot operands in bf16, fp32 accumulation);
b_hid [L, H] fp32; w_out [H] fp32; scratch pre [B, L, H] fp32 (pre-activations), grad [2, B, H] fp32
(ping-pong g_l); energy [K, programs] fp32 (sum of f over the program's rows); first_bad [programs] int32.

Hidden and latent widths are tiled (BLOCK_H, BLOCK_D) and masked, so any width runs; a program's row scratch
is written and read back by its own threads with a barrier between phases (no cross-program traffic).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._utils import (
    ACTIVATIONS,
    LEAKY_SLOPE,
    ChainResult,
    Weights,
    check_chain_args,
    langevin_reference,
)

__all__ = ["langevin_reference", "langevin_triton", "rows_per_program", "triton_can_launch",
           "triton_unsupported_reason"]

# TRITON_INTERPRET is read when @triton.jit decorates, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_LAYERS, MAX_HIDDEN, MAX_LATENT = 4, 512, 256
_ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}  # gelu 0, gelu_tanh 1, leaky_relu 2, silu 3


@triton.jit
def _act(a, ACTIVATION: tl.constexpr, LEAKY_SLOPE: tl.constexpr):
    """act(a) for the activation id (see _ACTIVATION_IDS)."""
    if ACTIVATION == 0:
        out = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACTIVATION == 1:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        out = 0.5 * a * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))  # 1 + tanh(u), overflow-safe
    elif ACTIVATION == 2:
        out = tl.where(a > 0, a, a * LEAKY_SLOPE)
    else:
        out = a / (1.0 + tl.exp(-a))
    return out


@triton.jit
def _act_grad(a, ACTIVATION: tl.constexpr, LEAKY_SLOPE: tl.constexpr):
    """act'(a) for the activation id."""
    if ACTIVATION == 0:
        out = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACTIVATION == 1:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        out = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
    elif ACTIVATION == 2:
        out = tl.where(a > 0, 1.0, LEAKY_SLOPE)
    else:
        sig = 1.0 / (1.0 + tl.exp(-a))
        out = sig * (1.0 + a * (1.0 - sig))
    return out


@triton.jit
def _round_tf32(x):
    """x rounded to TF32 (10-bit mantissa, round half away from zero): what a TF32 tensor core multiplies."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b with fp32 accumulation; DOT (see _DOT_CODES): 0 exact fp32 (IEEE), 1 TF32 operands, 2 bf16
    operands; 3 and 4 emulate 2 and 1 in the interpreter (operands rounded, then multiplied exactly)."""
    if DOT == 1:
        out = tl.dot(a, b, input_precision="tf32")
    elif DOT == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif DOT == 3:
        # The Triton 3.9 interpreter multiplies bf16 dot operands as their raw uint16 bits (garbage); round
        # the operands to bf16 and multiply them exactly in fp32 instead, which is what tensor cores compute.
        a16, b16 = a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32)
        out = tl.dot(a16, b16, input_precision="ieee")
    elif DOT == 4:
        # The interpreter ignores input_precision (numpy fp32 matmul): round the operands to TF32 here.
        out = tl.dot(_round_tf32(a.to(tl.float32)), _round_tf32(b.to(tl.float32)), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def _update(z, grad_f, eps, drift, score_scale, noise_std, LAPLACE: tl.constexpr):
    """The Langevin update of one tile, both kernels: z + drift grad f + score_scale score(z) + noise_std eps,
    with score(z) = -sign(z) (laplace; 0 at exactly 0, like torch.sign) or -z (gaussian); the reference's
    scale b is folded into score_scale by the launcher."""
    if LAPLACE:
        score = tl.where(z > 0, -1.0, tl.where(z < 0, 1.0, 0.0))
    else:
        score = -z
    return z + drift * grad_f + score_scale * score + noise_std * eps


@triton.jit
def _fresh_noise(seed, idx, k):
    """N(0, 1) for the elements ``idx`` (row * d + col) of step k: Philox counter (lo, hi) = (idx, k), a
    64-bit offset whose high word is the step, so both kernels draw the same eps for the same seed."""
    return tl.randn(seed, ((tl.zeros_like(idx) + k) << 32) + idx)


@triton.jit
def _langevin_chain_kernel(
    z_ptr, w_in_ptr, w_hid_ptr, b_hid_ptr, w_out_ptr, noise_ptr, pre_ptr, grad_ptr, energy_ptr,
    first_bad_ptr, batch, steps, seed, b_out, drift, noise_std, score_scale,
    LATENT: tl.constexpr, HIDDEN: tl.constexpr, NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr,
    LEAKY_SLOPE: tl.constexpr, LAPLACE: tl.constexpr, NOISE_FROM_TENSOR: tl.constexpr,
    RETURN_ENERGIES: tl.constexpr, DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_m = (rows < batch)[:, None]  # (BLOCK_B, 1)
    rows64 = rows.to(tl.int64)[:, None]
    z_rows = z_ptr + rows64 * LATENT
    pre_rows = pre_ptr + rows64 * (NUM_LAYERS * HIDDEN)  # a_l of row r at pre_rows + l * HIDDEN
    grad_rows = grad_ptr + rows64 * HIDDEN  # g in slot j at grad_rows + j * slot
    slot = batch * HIDDEN  # the launcher keeps 2 * batch * HIDDEN < 2^31
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    first_bad = steps
    noise_step_ptr = noise_ptr  # advanced by one [B, d] slice per step (64-bit pointer: no int32 overflow)

    for k in range(steps):
        # Forward, layer 1: a_1 = z W_1^T + b_1, tiled over output columns n and latent chunks c.
        for n0 in range(0, HIDDEN, BLOCK_H):
            n = n0 + offs_h
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for c0 in range(0, LATENT, BLOCK_D):
                c = c0 + offs_d
                zt = tl.load(z_rows + c[None, :], mask=row_m & (c < LATENT)[None, :], other=0.0)
                wt = tl.load(w_in_ptr + n[:, None] * LATENT + c[None, :],
                             mask=(n < HIDDEN)[:, None] & (c < LATENT)[None, :], other=0.0)
                acc += _dot(zt, tl.trans(wt), DOT)
            acc += tl.load(b_hid_ptr + n, mask=n < HIDDEN, other=0.0)[None, :]
            tl.store(pre_rows + n[None, :], acc, mask=row_m & (n < HIDDEN)[None, :])
        tl.debug_barrier()
        # Forward, layers 2..L: a_l = act(a_{l-1}) W_l^T + b_l (act recomputed from the stored a_{l-1}).
        for layer in tl.static_range(1, NUM_LAYERS):
            w_l = w_hid_ptr + (layer - 1) * HIDDEN * HIDDEN
            for n0 in range(0, HIDDEN, BLOCK_H):
                n = n0 + offs_h
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for c0 in range(0, HIDDEN, BLOCK_H):
                    c = c0 + offs_h
                    a = tl.load(pre_rows + (layer - 1) * HIDDEN + c[None, :],
                                mask=row_m & (c < HIDDEN)[None, :], other=0.0)
                    wt = tl.load(w_l + n[:, None] * HIDDEN + c[None, :],
                                 mask=(n < HIDDEN)[:, None] & (c < HIDDEN)[None, :], other=0.0)
                    acc += _dot(_act(a, ACTIVATION, LEAKY_SLOPE), tl.trans(wt), DOT)
                acc += tl.load(b_hid_ptr + layer * HIDDEN + n, mask=n < HIDDEN, other=0.0)[None, :]
                tl.store(pre_rows + layer * HIDDEN + n[None, :], acc, mask=row_m & (n < HIDDEN)[None, :])
            tl.debug_barrier()
        # Output layer: g_L = w_out * act'(a_L), and f = w_out . act(a_L) + b_out when energies are asked for.
        f_rows = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for n0 in range(0, HIDDEN, BLOCK_H):
            n = n0 + offs_h
            mask = row_m & (n < HIDDEN)[None, :]
            a = tl.load(pre_rows + (NUM_LAYERS - 1) * HIDDEN + n[None, :], mask=mask, other=0.0)
            w = tl.load(w_out_ptr + n, mask=n < HIDDEN, other=0.0)[None, :]
            g = w * _act_grad(a, ACTIVATION, LEAKY_SLOPE)
            tl.store(grad_rows + ((NUM_LAYERS - 1) % 2) * slot + n[None, :], g, mask=mask)
            if RETURN_ENERGIES:
                f_rows += tl.sum(w * _act(a, ACTIVATION, LEAKY_SLOPE), axis=1)
        if RETURN_ENERGIES:
            f_sum = tl.sum(tl.where(rows < batch, f_rows + b_out, 0.0), axis=0)
            tl.store(energy_ptr + k * tl.num_programs(0) + pid, f_sum)
        tl.debug_barrier()
        # Backward through layers L..2: g_{l-1} = (g_l W_l) * act'(a_{l-1}), g_l in slot l % 2.
        for layer in tl.static_range(NUM_LAYERS - 1, 0, -1):
            w_l = w_hid_ptr + (layer - 1) * HIDDEN * HIDDEN
            for n0 in range(0, HIDDEN, BLOCK_H):
                n = n0 + offs_h
                mask = row_m & (n < HIDDEN)[None, :]
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for c0 in range(0, HIDDEN, BLOCK_H):
                    c = c0 + offs_h
                    g = tl.load(grad_rows + (layer % 2) * slot + c[None, :],
                                mask=row_m & (c < HIDDEN)[None, :], other=0.0)
                    w = tl.load(w_l + c[:, None] * HIDDEN + n[None, :],
                                mask=(c < HIDDEN)[:, None] & (n < HIDDEN)[None, :], other=0.0)
                    acc += _dot(g, w, DOT)
                a = tl.load(pre_rows + (layer - 1) * HIDDEN + n[None, :], mask=mask, other=0.0)
                g_prev = acc * _act_grad(a, ACTIVATION, LEAKY_SLOPE)
                tl.store(grad_rows + ((layer - 1) % 2) * slot + n[None, :], g_prev, mask=mask)
            tl.debug_barrier()
        # Update: z += drift * g_1 W_1 + score_scale * score(z) + noise_std * eps, tiled over latent columns.
        bad = 0
        for c0 in range(0, LATENT, BLOCK_D):
            c = c0 + offs_d
            mask = row_m & (c < LATENT)[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
            for n0 in range(0, HIDDEN, BLOCK_H):
                n = n0 + offs_h
                g = tl.load(grad_rows + n[None, :], mask=row_m & (n < HIDDEN)[None, :], other=0.0)
                w = tl.load(w_in_ptr + n[:, None] * LATENT + c[None, :],
                            mask=(n < HIDDEN)[:, None] & (c < LATENT)[None, :], other=0.0)
                acc += _dot(g, w, DOT)
            zt = tl.load(z_rows + c[None, :], mask=mask, other=0.0)
            idx = rows64 * LATENT + c[None, :]
            if NOISE_FROM_TENSOR:
                eps = tl.load(noise_step_ptr + idx, mask=mask, other=0.0)
            else:
                eps = _fresh_noise(seed, idx, k)
            z_new = _update(zt, acc, eps, drift, score_scale, noise_std, LAPLACE)
            tl.store(z_rows + c[None, :], z_new, mask=mask)
            bad += tl.sum(tl.where(mask & ((z_new != z_new) | (tl.abs(z_new) == float("inf"))), 1, 0))
        first_bad = tl.minimum(first_bad, tl.where(bad > 0, k, steps))
        if NOISE_FROM_TENSOR:
            noise_step_ptr += batch * LATENT
        tl.debug_barrier()
    tl.store(first_bad_ptr + pid, first_bad)


@triton.jit
def _langevin_resident_kernel(
    z_ptr, w_in_ptr, w_hid_ptr, b_hid_ptr, w_out_ptr, noise_ptr, energy_ptr, first_bad_ptr,
    batch, steps, seed, b_out, drift, noise_std, score_scale,
    LATENT: tl.constexpr, HIDDEN: tl.constexpr, NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr,
    LEAKY_SLOPE: tl.constexpr, LAPLACE: tl.constexpr, NOISE_FROM_TENSOR: tl.constexpr,
    RETURN_ENERGIES: tl.constexpr, DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """The chain with the weights, z and every a_l, g_l on chip: weights loaded once, K steps in the program.

    Whole layers as single tiles (H_PAD x D_PAD, H_PAD x H_PAD; zero-padded, so padded units stay 0), at
    most two hidden layers; no scratch memory and no barriers. z goes back to memory once, after step K.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    rows64 = rows.to(tl.int64)[:, None]
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    h_ok, d_ok = offs_h < HIDDEN, offs_d < LATENT
    z_mask = row_ok[:, None] & d_ok[None, :]
    idx = rows64 * LATENT + offs_d[None, :]  # element index in [B, d]: z, given noise, Philox counter

    w1 = tl.load(w_in_ptr + offs_h[:, None] * LATENT + offs_d[None, :],
                 mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # W_1 [H, d]
    w1_t = tl.trans(w1)
    b1 = tl.load(b_hid_ptr + offs_h, mask=h_ok, other=0.0)[None, :]
    if NUM_LAYERS == 2:
        w2 = tl.load(w_hid_ptr + offs_h[:, None] * HIDDEN + offs_h[None, :],
                     mask=h_ok[:, None] & h_ok[None, :], other=0.0)  # W_2 [H, H]
        w2_t = tl.trans(w2)
        b2 = tl.load(b_hid_ptr + HIDDEN + offs_h, mask=h_ok, other=0.0)[None, :]
    w_out = tl.load(w_out_ptr + offs_h, mask=h_ok, other=0.0)[None, :]
    z = tl.load(z_ptr + idx, mask=z_mask, other=0.0)
    first_bad = steps
    noise_step_ptr = noise_ptr

    for k in range(steps):
        a1 = _dot(z, w1_t, DOT) + b1
        if NUM_LAYERS == 2:
            a_last = _dot(_act(a1, ACTIVATION, LEAKY_SLOPE), w2_t, DOT) + b2
        else:
            a_last = a1
        g = w_out * _act_grad(a_last, ACTIVATION, LEAKY_SLOPE)  # g_L
        if RETURN_ENERGIES:
            f_rows = tl.sum(w_out * _act(a_last, ACTIVATION, LEAKY_SLOPE), axis=1) + b_out
            tl.store(energy_ptr + k * tl.num_programs(0) + pid, tl.sum(tl.where(row_ok, f_rows, 0.0), axis=0))
        if NUM_LAYERS == 2:
            g = _dot(g, w2, DOT) * _act_grad(a1, ACTIVATION, LEAKY_SLOPE)  # g_1
        grad_f = _dot(g, w1, DOT)  # [BLOCK_B, D_PAD]
        if NOISE_FROM_TENSOR:
            eps = tl.load(noise_step_ptr + idx, mask=z_mask, other=0.0)
            noise_step_ptr += batch * LATENT
        else:
            eps = _fresh_noise(seed, idx, k)
        z = tl.where(z_mask, _update(z, grad_f, eps, drift, score_scale, noise_std, LAPLACE), 0.0)
        bad = tl.sum(tl.where((z != z) | (tl.abs(z) == float("inf")), 1, 0))
        first_bad = tl.minimum(first_bad, tl.where(bad > 0, k, steps))
    tl.store(z_ptr + idx, z, mask=z_mask)
    tl.store(first_bad_ptr + pid, first_bad)


def triton_can_launch(device: torch.device) -> str | None:
    """None when the kernel can run on ``device``; else why not (CPU: TRITON_INTERPRET=1 before import)."""
    if device.type == "cuda" or INTERPRETED:
        return None
    return (f"the Triton Langevin kernel needs CUDA tensors, got {device.type} tensors; on CPU it runs only "
            "in the Triton interpreter: set TRITON_INTERPRET=1 before importing mmebm_dist.kernels (slow; "
            "for tests), or use backend='torch'")


def triton_unsupported_reason(weights: Weights, z0: torch.Tensor, activation: str) -> str | None:
    """None when the kernel supports this MLP and input, else a one-line reason (forced triton raises it)."""
    layers, hidden, latent = len(weights) - 1, weights[0][0].shape[0], z0.shape[1]
    dtypes = {w.dtype for w, _ in weights}
    if activation not in _ACTIVATION_IDS:
        return f"activation '{activation}' (supported: {', '.join(ACTIVATIONS)})"
    if not 1 <= layers <= MAX_LAYERS:
        return f"{layers} hidden layers (supported: 1-{MAX_LAYERS})"
    if hidden > MAX_HIDDEN:
        return f"hidden width {hidden} (supported: up to {MAX_HIDDEN})"
    if latent > MAX_LATENT:
        return f"latent width {latent} (supported: up to {MAX_LATENT})"
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
        return f"weight dtypes {sorted(str(d) for d in dtypes)} (supported: all float32 or all bfloat16)"
    if z0.dtype not in (torch.float32, torch.bfloat16):
        return f"z0 dtype {z0.dtype} (supported: float32, bfloat16; the chain state is fp32)"
    if 2 * z0.shape[0] * max(hidden, latent) >= 2**31:
        return f"batch {z0.shape[0]} (supported: 2 x batch x max(hidden, latent) < 2^31)"
    return None


PRECISIONS = ("ieee", "tf32", "bf16")
"""Dot operands: exact fp32 (no TF32), TF32 (10-bit mantissa) or bf16 (8-bit); fp32 accumulation in all."""
_DOT_CODES = {("ieee", False): 0, ("tf32", False): 1, ("bf16", False): 2, ("bf16", True): 3,
              ("tf32", True): 4, ("ieee", True): 0}
KERNELS = ("auto", "resident", "streaming")
RESIDENT_MAX_LAYERS, RESIDENT_MAX_HIDDEN, RESIDENT_MAX_LATENT = 2, 256, 64
H200_SMS = 132


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resident_unsupported_reason(hidden: int, latent: int, layers: int) -> str | None:
    """None when the resident kernel holds this MLP on chip (<= 2 hidden layers of <= 256, d <= 64)."""
    if layers > RESIDENT_MAX_LAYERS:
        return f"{layers} hidden layers (the resident kernel holds at most {RESIDENT_MAX_LAYERS})"
    if hidden > RESIDENT_MAX_HIDDEN or latent > RESIDENT_MAX_LATENT:
        return (f"widths {latent}-{hidden} (the resident kernel holds hidden <= {RESIDENT_MAX_HIDDEN}, "
                f"latent <= {RESIDENT_MAX_LATENT})")
    return None


SHARED_MEMORY_PER_BLOCK = 232_448
"""Opt-in shared memory per block of an H100 and an H200 (227 KiB, bytes): the budget the resident kernel is
planned against where the device cannot be asked (the interpreter); on CUDA the device's figure is used."""


def resident_shared_bytes(hidden: int, latent: int, layers: int, rows: int, weight_bytes: int) -> int:
    """Shared memory (bytes) the resident kernel needs: its weight tiles in their storage dtype, W_1
    (H_PAD x D_PAD) and W_2 (H_PAD x H_PAD, with 2 hidden layers), plus one fp32 [rows, H_PAD] activation tile
    staged for a dot. Widths pad to powers of two >= 16.

    The shipped 32-200x2 energy, 16 rows: fp32 (256*32 + 256*256) * 4 + 16*256*4 = 311,296 B, the figure
    Triton reported when it refused the kernel on the H200 (232,448 B); bf16 weights: 147,456 + 16,384 =
    163,840 B, which fits (64 rows: 212,992 B). Unpadded, the bf16 weights are (200*32 + 200*200) * 2 =
    92,800 B.
    """
    h_pad, d_pad = max(16, triton.next_power_of_2(hidden)), max(16, triton.next_power_of_2(latent))
    weight_elements = h_pad * d_pad + (layers - 1) * h_pad * h_pad
    return weight_elements * weight_bytes + rows * h_pad * 4


def shared_memory_per_block(device: torch.device) -> int:
    """The opt-in shared memory per block of ``device`` (CUDA), else :data:`SHARED_MEMORY_PER_BLOCK`."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return SHARED_MEMORY_PER_BLOCK


def plan_kernel(kernel: str, precision: str | None, weight_dtype: torch.dtype, *, hidden: int, latent: int,
                layers: int, rows: int, budget: int, tiles_given: bool = False) -> tuple[str, str]:
    """(kernel, precision) to run. ``precision`` None: bf16 for bf16 weights, else ieee. ``kernel='auto'``:
    resident where its widths are supported, no streaming tiles were given and :func:`resident_shared_bytes`
    fits ``budget``; with fp32 weights and no precision asked for, the resident kernel with its weights in
    bf16 (fp32 accumulation) when only that fits (the 32-200x2 energy on an H100/H200); else streaming."""
    default = "bf16" if weight_dtype == torch.bfloat16 else "ieee"
    chosen = precision or default
    if kernel != "auto":
        return kernel, chosen
    if tiles_given or resident_unsupported_reason(hidden, latent, layers) is not None:
        return "streaming", chosen

    def fits(p: str) -> bool:
        return resident_shared_bytes(hidden, latent, layers, rows, 2 if p == "bf16" else 4) <= budget

    if fits(chosen):
        return "resident", chosen
    if precision is None and fits("bf16"):
        return "resident", "bf16"
    return "streaming", chosen


def _dot_weights(weights: Weights, precision: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_in [H, d], w_hid [max(L-1, 1), H, H]) in the precision's storage: bf16 for bf16 dots, else fp32."""
    mat_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    w_in = weights[0][0].detach().to(mat_dtype).contiguous()
    if len(weights) > 2:
        w_hid = torch.stack([w.detach().to(mat_dtype) for w, _ in weights[1:-1]]).contiguous()  # (L-1, H, H)
    else:
        w_hid = torch.zeros(1, 1, 1, device=device, dtype=mat_dtype)  # never read when L = 1
    return w_in, w_hid


def rows_per_program(batch: int, sms: int) -> int:
    """BLOCK_B of the resident kernel: 16 rows (tl.dot's minimum) until the batch gives every SM a program,
    then more rows per program so that there is about one program per SM (at most 64 rows).

    Why (H200, 132 SMs, docs/bench/h200_run1_tiles.log, h200_run2_tiles_small.log, the streaming kernel with
    16-row programs, 32-200x2 GELU, K 60): a chain took the same 5.5-6.4 ms at batch 16, 256 and 1,024 (1, 16
    and 64 programs: one program's step latency, ~98 us, is the time) and 8.5-11 ms at 4,096 (256 programs,
    two waves). So programs beyond the SM count cost a wave while rows within a program cost little; 32 or
    64-row programs were slower only while SMs sat idle.
    """
    want = triton.cdiv(batch, max(sms, 1))
    return min(64, max(16, triton.next_power_of_2(want)))


def _block_sizes(hidden: int, latent: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_D): 16 rows x 64 (fp32) or 128 (bf16) hidden x 32 latent, narrower for
    narrower layers (16: tl.dot's minimum); 4 warps.

    Timed on an H200 (`mmebm bench kernel-tiles`, 32-200x2 GELU, K 60; docs/bench/): 16x64x32 beat the earlier
    16x32x32 at every batch from 16 to 4096 in fp32 (5.5-5.7 vs 6.4 ms at B 256-1024, 8.5 vs 11.0 at 4096) and
    bf16; in bf16 16x128x32 was faster still (2.1-2.5 vs 3.0-3.3 ms). More rows per program (32, 64) or
    8 warps were slower with fp32 operands.
    """
    block_h = min(128 if dtype == torch.bfloat16 else 64, max(16, triton.next_power_of_2(hidden)))
    return 16, block_h, min(32, max(16, triton.next_power_of_2(latent)))


def langevin_triton(weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                    reference: str = "laplace", reference_scale: float = 1.0,
                    noise: torch.Tensor | None = None, seed: int = 0, return_energies: bool = False,
                    leaky_slope: float = LEAKY_SLOPE, precision: str | None = None,
                    kernel: str = "auto", block_sizes: tuple[int, int, int] | None = None,
                    rows: int | None = None, num_warps: int | None = None) -> ChainResult:
    """Run the K-step chain in one kernel launch, noise from ``noise`` [K, B, d] or Philox keyed by ``seed``.

    ``precision`` (PRECISIONS) sets the dot operands; None: bf16 for bf16 weights, else ieee (exact fp32).
    ``kernel``: ``resident`` (weights on chip, see _langevin_resident_kernel; <= 2 hidden layers of
    <= 256, d <= 64), ``streaming`` (any supported MLP, tiled, weights re-read from L2 every step) or
    ``auto`` (:func:`plan_kernel`: resident where its shared memory fits and no ``block_sizes`` were given,
    with bf16 weights when only that fits and no ``precision`` was asked for). ``block_sizes`` (BLOCK_B,
    BLOCK_H, BLOCK_D), powers of two >= 16, override the streaming kernel's tiles and ``rows`` the resident
    kernel's rows per program (default: :func:`rows_per_program`); ``num_warps`` the warps per program
    (default 4). Raises ValueError when the
    configuration is unsupported or the kernel cannot launch on z0's device.
    """
    d, hidden, layers = check_chain_args(weights, z0, steps=steps, step_size=step_size, activation=activation,
                                         reference=reference, reference_scale=reference_scale, noise=noise)
    reason = triton_can_launch(z0.device)
    if reason is not None:
        raise ValueError(reason)
    reason = triton_unsupported_reason(weights, z0, activation)
    if reason is not None:
        raise ValueError(f"the Triton Langevin kernel does not support {reason}; use backend='torch'")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got '{kernel}'")
    device, batch = z0.device, z0.shape[0]
    too_big = resident_unsupported_reason(hidden, d, layers)
    auto = kernel == "auto"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    block_b = rows or rows_per_program(batch, sms)
    asked_precision = precision
    kernel, precision = plan_kernel(kernel, precision, weights[0][0].dtype, hidden=hidden, latent=d,
                                    layers=layers, rows=block_b, budget=shared_memory_per_block(device),
                                    tiles_given=block_sizes is not None)
    if kernel == "resident" and too_big is not None:
        raise ValueError(f"kernel='resident' does not fit {too_big}; use kernel='streaming' or 'auto'")
    if num_warps is None:
        num_warps = 4
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    if steps == 0:
        energies = z0.new_zeros(0, dtype=torch.float32) if return_energies else None
        return ChainResult(z0.detach().clone(), energies, None)
    w_in, w_hid = _dot_weights(weights, precision, device)
    b_hid = torch.stack([b.detach().float() for _, b in weights[:-1]]).contiguous()  # (L, H)
    w_out = weights[-1][0].detach().float().reshape(hidden).contiguous()
    b_out = float(weights[-1][1].detach().float().item())
    z = z0.detach().to(torch.float32, copy=True).contiguous()
    noise_arg = noise.detach().to(torch.float32).contiguous() if noise is not None else z  # z: never read
    drift = 0.5 * step_size**2
    score_scale = drift / reference_scale if reference == "laplace" else drift / reference_scale**2
    common = dict(LATENT=d, HIDDEN=hidden, NUM_LAYERS=layers, ACTIVATION=_ACTIVATION_IDS[activation],
                  LEAKY_SLOPE=float(leaky_slope), LAPLACE=reference == "laplace",
                  NOISE_FROM_TENSOR=noise is not None, RETURN_ENERGIES=return_energies, num_warps=num_warps)

    if kernel == "resident":
        if block_b < 16 or block_b & (block_b - 1):
            raise ValueError(f"rows must be a power of two >= 16, got {block_b}")
        programs = triton.cdiv(batch, block_b)
        energy = torch.empty(max(steps, 1), programs, device=device, dtype=torch.float32)
        first_bad = torch.empty(programs, device=device, dtype=torch.int32)
        try:
            _langevin_resident_kernel[(programs,)](
                z, w_in, w_hid, b_hid, w_out, noise_arg, energy, first_bad,
                batch, steps, seed, b_out, drift, step_size, score_scale,
                BLOCK_B=block_b, H_PAD=max(16, triton.next_power_of_2(hidden)),
                D_PAD=max(16, triton.next_power_of_2(d)), DOT=_DOT_CODES[(precision, INTERPRETED)], **common,
            )
        except OutOfResources as exc:  # the layers' tiles exceed this GPU's shared memory / registers
            if not auto:
                raise ValueError(f"kernel='resident' does not fit this GPU ({exc}); "
                                 "use kernel='streaming'") from exc
            _warn_once(f"the resident Langevin kernel does not fit this GPU for {d}-{hidden}x{layers} "
                       f"{precision} ({exc}); running the streaming kernel")
            kernel = "streaming"
            # bf16 may have been planned for the resident kernel only: back to what was asked (or default).
            precision = asked_precision or ("bf16" if weights[0][0].dtype == torch.bfloat16 else "ieee")
            w_in, w_hid = _dot_weights(weights, precision, device)
    if kernel == "streaming":
        mat_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        block_b, block_h, block_d = block_sizes or _block_sizes(hidden, d, mat_dtype)
        if any(b < 16 or b & (b - 1) for b in (block_b, block_h, block_d)):
            raise ValueError(f"block sizes must be powers of two >= 16, got {(block_b, block_h, block_d)}")
        programs = triton.cdiv(batch, block_b)
        pre = torch.empty(batch, layers, hidden, device=device, dtype=torch.float32)
        grad = torch.empty(2, batch, hidden, device=device, dtype=torch.float32)
        energy = torch.empty(max(steps, 1), programs, device=device, dtype=torch.float32)
        first_bad = torch.empty(programs, device=device, dtype=torch.int32)
        _langevin_chain_kernel[(programs,)](
            z, w_in, w_hid, b_hid, w_out, noise_arg, pre, grad, energy, first_bad,
            batch, steps, seed, b_out, drift, step_size, score_scale,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_D=block_d, DOT=_DOT_CODES[(precision, INTERPRETED)],
            **common,
        )
    energies = energy[:steps].sum(1) / batch if return_energies else None
    bad = int(first_bad.min())
    return ChainResult(z.to(z0.dtype), energies, bad if bad < steps else None)
