"""The FKD / FerKD soft-label loss: a fused Triton kernel on CUDA; on CPU, the loss as its definition.

    from kernels_triton import ferkd_loss, region_category
    loss = ferkd_loss(logits, topk_idx, topk_prob, p_gt, target, mix,
                      t_low=0.2, t_mid=0.5, t_top=0.9, eps=0.1)   # FerKD; t_low=t_mid=0, t_top=1 is plain FKD
    loss.backward()
    python kernels_triton.py                                      # benchmark (see __main__)

On CPU, `ferkd_loss_torch` builds each region's (C,) target, mixes them and takes the cross-entropy, with
autograd's gradient: what the method is, readable top to bottom. (A sparse CPU path that never built the
target was measured at 0.65-1.0x of this dense way for C <= 1000 on 2 cores, eager or compiled, and was
removed.) On CUDA the Triton kernel never builds the (B, C) target: each row's target is a constant plus
M*K + 1 sparse entries, so the loss and its gradient read each row of logits once (twice, the second mostly
from L2, when a row is wider than 4,096 classes) and write the gradient once. The gradient is computed in
the forward pass (the loss is terminal, as in Liger-Kernel's cross-entropy) and scaled by the upstream
gradient in backward. The tests check both against
a float64 dense reference of their own.

Legend: B rows, C classes, M regions mixed into a row (SelfMix; M=1 without it), K teacher top-k per region,
T temperature, z = logits / T, s = softmax(z), I/P = teacher top-k classes/probabilities, p = teacher
probability of the ground-truth class t of a region, a = mixing weights.

Target of region m (FKD's marginal smoothing + FerKD's calibration by p, thresholds t_low <= t_mid <= t_top):
    q_m    = P_mk on I_mk, u_m = max(1 - sum_k P_mk, 0) / (C - K) on every other class    (u_m = 0 if C = K)
    p < t_low or p > t_top  -> dropped (teacher unreliable on the crop, or the crop too easy to teach)
    t_low <= p < t_mid      -> hard region: 1 - eps on t, e = eps / (C - 1) elsewhere
    otherwise               -> soft region: q_m
Row target: y = sum_m a_m y_m / sum_m a_m over kept regions (w = 1), or y = 0 when none is kept (w = 0).
With a^ the renormalized weights (0 on dropped regions), y = U + sum_mk V_mk [c = I_mk] + H [c = t] where
    U = sum_soft a^_m u_m + sum_hard a^_m e,   V_mk = a^_m [soft] (P_mk - u_m),
    H = sum_hard a^_m (1 - eps - e)
Loss, logged as the cross-entropy with the soft target (not KL: they differ by the target's entropy, which
is constant for the student, so the gradient is the same):
    CE_b = -sum_c y_c log s_c = lse(z) sum_c y_c - U sum_c z_c - sum_mk V_mk z_I - H z_t
    loss = T^2 sum_b CE_b / N,   N = max(sum_b w_b, 1)
    d loss / d logits = T (s sum_c y_c - y) / N      (= 0 on dropped rows, where y = 0)
Soft-target gradients shrink as 1/T^2, hence the T^2 factor (Hinton et al. 2015, "Distilling the Knowledge in
a Neural Network", sec. 2); it is 1 at the FKD/FerKD default T = 1.
"""

import functools
import time

import numpy as np
import torch
import triton
import triton.language as tl

TINY = torch.finfo(torch.float32).tiny                           # smallest normal fp32

# ------------------------------------------------------------------------------------------------------------
# The calibration rule, and the loss as its definition (the CPU path)
# ------------------------------------------------------------------------------------------------------------


def rest_share(topk_prob, C):
    """u = max(1 - sum_k P_k, 0) / (C - K): the teacher mass outside a stored top-k spread evenly over the
    C - K other classes (FKD's marginal smoothing), 0 when C = K. topk_prob (..., K), a torch tensor or a
    NumPy array, -> (..., 1) of its dtype. The one definition of the share: the loss's target, the label
    codec's order check (beton.pack_regions), `labels.py fidelity` and FKD's estimated p_gt all read it.
    Clamped: an fp32 (or an imported fp16) top-k may sum a little past 1."""
    K = topk_prob.shape[-1]
    if isinstance(topk_prob, torch.Tensor):
        rest = (1 - topk_prob.sum(-1, keepdim=True)).clamp_min(0)
    else:
        rest = np.maximum(1 - topk_prob.sum(-1, keepdims=True), 0)
    return rest / (C - K) if C > K else rest * 0


def region_category(p_gt, t_low, t_mid, t_top):
    """FerKD calibration of a region by its teacher p_gt: 0 dropped, 1 hard (softened one-hot), 2 soft."""
    p = p_gt.float()                                              # fp32 compares on every device and dtype
    kept = (p >= t_low) & (p <= t_top)
    return torch.where(kept, torch.where(p < t_mid, 1, 2), 0).to(torch.int8)


def region_weights(p_gt, mix, t_low, t_top):
    """region_category's kept regions as the loss weighs them: mixing weights renormalized per row (B, M), 0
    on dropped regions; and which rows keep a region, (B, 1) 1.0 or 0.0. Needs t_low <= t_top."""
    p = p_gt.float()                                              # (B, M) fp32 compares, as region_category
    a = torch.where(p.clamp(t_low, t_top) == p, mix.float(), 0.0)  # (B, M) t_low <= p <= t_top in 2 ops
    total = a.sum(1, keepdim=True)                                # (B, 1) 0 when every region is dropped
    return a / total.clamp_min(TINY), total.sign()                # rows with total = 0 stay all-zero


def ferkd_loss_torch(logits, topk_idx, topk_prob, p_gt, target, mix, *, t_low, t_mid, t_top, eps,
                     temperature=1.0):
    """The loss as the module docstring defines it, with autograd's gradient: the CPU path. Builds each
    region's (C,) target, mixes them into the row's, and takes the soft cross-entropy with softmax(z / T)."""
    B, C = logits.shape
    M, K = topk_idx.shape[1:]
    a, kept = region_weights(p_gt, mix, t_low, t_top)            # (B, M) renormalized, 0 if dropped; (B, 1)
    P = topk_prob.float()                                         # (B, M, K)
    u = rest_share(P, C)                                          # (B, M, 1) on classes outside the top-k
    y_m = u.expand(B, M, C).scatter_add(2, topk_idx.long(), P - u)  # (B, M, C) q_m: P on the top-k, u else
    if t_mid > t_low:                                             # hard regions: the softened truth instead
        hard = torch.full((B, M, C), eps / (C - 1), device=logits.device)
        hard.scatter_(2, target.long().view(B, 1, 1).expand(B, M, 1), 1 - eps)
        y_m = torch.where((p_gt.float() < t_mid)[..., None], hard, y_m)
    y = (a[..., None] * y_m).sum(1)                               # (B, C) the row's target (0 if none kept)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fp64 stays fp64
    ce = -(y * torch.log_softmax(z, 1)).sum(1)
    return temperature**2 * ce.sum() / kept.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per row; pass 1 = online log-sum-exp, pass 2 = gradient, then the sparse entries
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _ferkd_loss_kernel(
    logits_ptr,   # (B, C) student logits (fp32/bf16/fp16), rows `stride_row` apart, columns contiguous
    grad_ptr,     # (B, C) out: d loss / d logits, contiguous, logits dtype (fp32 for fp16 logits: grad_dtype)
    loss_ptr,     # (B,) out, fp32: T^2 CE_b / N, summed by the launcher (deterministic: no atomics)
    idx_ptr,      # (B, M, K) teacher top-k class ids (any int dtype), contiguous
    prob_ptr,     # (B, M, K) teacher top-k probabilities, contiguous
    w_soft_ptr,   # (B, M) fp32 renormalized weight of each soft region (0 if the region is hard or dropped)
    w_hard_ptr,   # (B, M) fp32 renormalized weight of each hard region
    target_ptr,   # (B,) ground-truth class (any int dtype)
    norm_ptr,     # () fp32 N = max(#kept rows, 1), read on device so that the host never waits
    stride_row, C, eps, e, inv_rest, inv_t, t,   # e = eps/(C-1); inv_rest = 1/(C-K) or 0 if C = K
    M: tl.constexpr, K: tl.constexpr, M_P: tl.constexpr, K_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ONE_BLOCK: tl.constexpr,      # C <= BLOCK_C: the row is read once and kept in registers
):
    b = tl.program_id(0).to(tl.int64)                             # int64: b * stride_row may exceed 2^31
    row = logits_ptr + b * stride_row
    grad_row = grad_ptr + b * C

    # Sparse target of this row (module docstring): U + V on the top-k classes + H on the true class.
    r = tl.arange(0, M_P)[:, None]                                # (M_P, 1) region
    k = tl.arange(0, K_P)[None, :]                                # (1, K_P) top-k slot
    rk = (r < M) & (k < K)
    # -1 marks padding only after the widening: `other=-1` in an unsigned id dtype would read as 255 / 65535,
    # pass the `I >= 0` masks below and read and write outside the row
    I = tl.where(rk, tl.load(idx_ptr + b * (M * K) + r * K + k, mask=rk, other=0).to(tl.int64), -1)
    P = tl.load(prob_ptr + b * (M * K) + r * K + k, mask=rk, other=0.0).to(tl.float32)
    ws = tl.load(w_soft_ptr + b * M + r, mask=r < M, other=0.0)   # (M_P, 1)
    wh = tl.load(w_hard_ptr + b * M + r, mask=r < M, other=0.0)   # (M_P, 1)
    u = tl.maximum(1.0 - tl.sum(P, axis=1)[:, None], 0.0) * inv_rest  # (M_P, 1); an fp32 sum may pass 1
    U = tl.sum(ws * u) + tl.sum(wh) * e
    H = tl.sum(wh) * (1.0 - eps - e)
    V = tl.reshape(tl.where(rk, ws * (P - u), 0.0), (M_P * K_P,))
    I = tl.reshape(I, (M_P * K_P,))                               # -1 on padding: matches no class
    tgt = tl.load(target_ptr + b).to(tl.int64)
    y_sum = U * C + tl.sum(V) + H

    # Pass 1: log-sum-exp and sum of z over the row, in fp32. A row that fits one block (C <= BLOCK_C: C = 1000)
    # stays in registers for pass 2, so the logits are read once; wider rows are read twice (the second time
    # mostly from L2) with an online log-sum-exp.
    if ONE_BLOCK:
        c = tl.arange(0, BLOCK_C)
        z_row = tl.load(row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_t
        mx = tl.max(z_row, axis=0)
        lse = mx + tl.log(tl.sum(tl.exp(z_row - mx), axis=0))
        z_sum = tl.sum(tl.where(c < C, z_row, 0.0), axis=0)
    else:
        mx = float("-inf")
        d = 0.0
        z_sum = 0.0
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            z = tl.load(row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_t
            mx_new = tl.maximum(mx, tl.max(z, axis=0))
            d = d * tl.exp(mx - mx_new) + tl.sum(tl.exp(z - mx_new), axis=0)
            mx = mx_new
            z_sum += tl.sum(tl.where(c < C, z, 0.0), axis=0)
        lse = mx + tl.log(d)

    z_I = tl.load(row + I, mask=I >= 0, other=0.0).to(tl.float32) * inv_t
    z_t = tl.load(row + tgt).to(tl.float32) * inv_t
    norm = tl.load(norm_ptr)
    ce = lse * y_sum - U * z_sum - tl.sum(V * z_I) - H * z_t
    tl.store(loss_ptr + b, ce * t * t / norm)

    # Pass 2: the dense part of the gradient, T (s sum_c y_c - U) / N, on every class...
    g_scale = t / norm
    if ONE_BLOCK:
        c = tl.arange(0, BLOCK_C)
        g = (tl.exp(z_row - lse) * y_sum - U) * g_scale
        tl.store(grad_row + c, g.to(grad_ptr.dtype.element_ty), mask=c < C)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            z = tl.load(row + c, mask=c < C, other=0.0).to(tl.float32) * inv_t
            g = (tl.exp(z - lse) * y_sum - U) * g_scale
            tl.store(grad_row + c, g.to(grad_ptr.dtype.element_ty), mask=c < C)
    # ...then overwrite the M*K+1 sparse classes, after a barrier so that these stores land last. A class can
    # appear several times (in two regions, or as a top-k class and the true class): sum all its entries, so
    # that duplicates write the same value.
    tl.debug_barrier()
    same = I[:, None] == I[None, :]                               # (M_P*K_P, M_P*K_P)
    V_I = tl.sum(tl.where(same, V[None, :], 0.0), axis=1) + tl.where(I == tgt, H, 0.0)
    V_t = H + tl.sum(tl.where(I == tgt, V, 0.0))
    g_I = (tl.exp(z_I - lse) * y_sum - U - V_I) * g_scale
    g_t = (tl.exp(z_t - lse) * y_sum - U - V_t) * g_scale
    tl.store(grad_row + I, g_I.to(grad_ptr.dtype.element_ty), mask=I >= 0)
    tl.store(grad_row + tgt, g_t.to(grad_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------------------

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)    # logits the kernel reads (fp32 inside)


def kernel_weights(p_gt, mix, t_low, t_mid, t_top):
    """The kernel's per-region inputs: soft and hard regions' renormalized weights, (B, M) fp32 each, and
    N = max(#kept rows, 1) as a 0-d device tensor (no host sync). Plain torch ops outside the op, so that a
    compiled step fuses them with its other small ops, as it fuses the definition's."""
    a, kept = region_weights(p_gt, mix, t_low, t_top)
    w_hard = torch.where(p_gt.float() < t_mid, a, 0.0)            # (B, M) 0 on soft and dropped regions
    return a - w_hard, w_hard, kept.sum().clamp_min(1.0)          # a - a = 0 exactly on hard ones


def kernel_launch(logits, topk_idx, topk_prob, w_soft, w_hard, target, norm, *, eps, temperature,
                  block_c=None, num_warps=None):
    """(launch, row losses (B,), gradient (B, C)): the outputs allocated and launch() running the kernel alone
    (what the benchmark times). block_c and num_warps override the defaults (kernel_sweep times others)."""
    B, C = logits.shape
    M, K = topk_idx.shape[1:]
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = torch.empty((B, C), dtype=grad_dtype(logits.dtype), device=logits.device)
    row_loss = torch.empty(B, dtype=torch.float32, device=logits.device)
    # Up to 4096 columns per step bounds the registers; larger C loops (C = 22k: 6 steps per pass).
    block_c = block_c or min(triton.next_power_of_2(C), 4096)
    args = (logits, grad, row_loss, topk_idx.contiguous(), topk_prob.contiguous(), w_soft.contiguous(),
            w_hard.contiguous(), target.contiguous(), norm, logits.stride(0), C, eps, eps / (C - 1),
            1.0 / (C - K) if C > K else 0.0, 1.0 / temperature, temperature)
    meta = dict(M=M, K=K, M_P=triton.next_power_of_2(M), K_P=triton.next_power_of_2(K), BLOCK_C=block_c,
                ONE_BLOCK=C <= block_c, num_warps=num_warps or (8 if block_c >= 2048 else 4))
    return lambda: _ferkd_loss_kernel[(B,)](*args, **meta), row_loss, grad


def ferkd_loss_triton(logits, topk_idx, topk_prob, p_gt, target, mix, *, t_low, t_mid, t_top, eps,
                      temperature=1.0, block_c=None):
    """(loss, d loss / d logits) of ferkd_loss_torch's loss by the Triton kernel, without autograd (CUDA, or
    TRITON_INTERPRET=1 on CPU tensors): what the tests and benchmarks call."""
    weights = kernel_weights(p_gt, mix, t_low, t_mid, t_top)
    launch, row_loss, grad = kernel_launch(logits, topk_idx, topk_prob, weights[0], weights[1], target,
                                           weights[2], eps=eps, temperature=temperature, block_c=block_c)
    launch()
    return row_loss.sum(), grad


# ------------------------------------------------------------------------------------------------------------
# torch.library op: the kernel as one opaque op with its gradient, which torch.compile(fullgraph=True) traces
# through; opcheck-clean (tested under TRITON_INTERPRET=1). Only the kernel is inside: the region weights
# before it and the sum of row losses after it are ordinary ops of the caller's graph.
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ferkd::loss", mutates_args=())
def _loss_op(logits: torch.Tensor, topk_idx: torch.Tensor, topk_prob: torch.Tensor, w_soft: torch.Tensor,
             w_hard: torch.Tensor, target: torch.Tensor, norm: torch.Tensor, eps: float,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    launch, row_loss, grad = kernel_launch(logits, topk_idx, topk_prob, w_soft, w_hard, target, norm, eps=eps,
                                           temperature=temperature)
    launch()
    return row_loss, grad


def grad_dtype(dtype):
    """The dtype the forward stores d loss / d logits in: the logits' own, except fp32 for fp16. Under fp16 +
    GradScaler the scale multiplies this gradient only in backward, and an fp16 gradient of T s_c / N flushes
    to zero below 6e-8 before the scale (2^16) could lift it; bf16 has fp32's range."""
    return torch.float32 if dtype == torch.float16 else dtype


@_loss_op.register_fake
def _loss_op_fake(logits, *args):
    return (logits.new_empty(logits.shape[:1], dtype=torch.float32),
            torch.empty_like(logits, dtype=grad_dtype(logits.dtype)))


def _loss_op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])                              # the gradient, computed in the forward
    ctx.mark_non_differentiable(output[1])                        # no second derivative through it
    ctx.logits_dtype = inputs[0].dtype


def _loss_op_backward(ctx, grad_rows, _grad_of_grad):
    """Row b's loss depends on row b's logits only: d(sum_b g_b loss_b) / d logits_b = g_b * grad_b. One
    elementwise pass, which a compiled step fuses."""
    (grad,) = ctx.saved_tensors
    return ((grad * grad_rows[:, None]).to(ctx.logits_dtype),) + (None,) * 8  # none to labels or weights


_loss_op.register_autograd(_loss_op_backward, setup_context=_loss_op_setup_context)

# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------


def ferkd_loss(logits, topk_idx, topk_prob, p_gt, target, mix, *, t_low, t_mid, t_top, eps, temperature=1.0,
               kernel="auto"):
    """T^2 * mean over kept rows of CE(calibrated soft target, softmax(logits / T)); see the module docstring.

    logits (B, C) fp32/bf16/fp16; topk_idx (B, M, K) int; topk_prob (B, M, K) float, dequantized; p_gt (B, M)
    float; target (B,) int; mix (B, M) float, rows summing to 1 (M=1, mix=1 without SelfMix). Returns a 0-d
    fp32 tensor; the gradient reaches logits only. t_low=0, t_mid=0, t_top=1 gives plain FKD.
    kernel: auto = the Triton kernel for CUDA logits of a dtype it reads (KERNEL_DTYPES), else the definition;
    triton = the kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1); torch = the definition.
    """
    B, C = logits.shape
    assert topk_idx.shape == topk_prob.shape and topk_idx.shape[0] == B, (topk_idx.shape, logits.shape)
    assert p_gt.shape == mix.shape == topk_idx.shape[:2] and target.shape == (B,), (p_gt.shape, target.shape)
    assert C >= 2 and topk_idx.shape[2] <= C and temperature > 0, (C, topk_idx.shape, temperature)
    assert t_low <= t_top, (t_low, t_top)                         # else region_weights' clamp misfiles
    assert kernel in ("auto", "triton", "torch"), kernel
    if kernel == "triton" or (kernel == "auto" and logits.is_cuda and logits.dtype in KERNEL_DTYPES):
        w_soft, w_hard, norm = kernel_weights(p_gt, mix, t_low, t_mid, t_top)
        row_loss, _ = torch.ops.ferkd.loss(logits, topk_idx, topk_prob, w_soft, w_hard, target, norm,
                                           float(eps), float(temperature))
        return row_loss.sum()
    return ferkd_loss_torch(logits, topk_idx, topk_prob, p_gt, target, mix, t_low=t_low, t_mid=t_mid,
                            t_top=t_top, eps=eps, temperature=temperature)


# ------------------------------------------------------------------------------------------------------------
# Benchmark: python kernels_triton.py
# ------------------------------------------------------------------------------------------------------------


def fkd_dense_loss(logits, topk_idx, topk_prob):
    """FKD's way (M=1, T=1): expand the top-k into a dense (B, C) target, then the soft cross-entropy."""
    B, C = logits.shape
    target = rest_share(topk_prob, C).expand(B, C).contiguous()  # (B, C)
    target.scatter_(1, topk_idx, topk_prob)
    return -(target * torch.log_softmax(logits.float(), 1)).sum(1).mean()


def _bench_batch(B, C, K, device, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(B, K + 1, generator=g)
    batch = dict(logits=torch.randn(B, C, generator=g) * 3,
                 topk_idx=torch.rand(B, C, generator=g).argsort(1)[:, :K],
                 topk_prob=(w / w.sum(1, keepdim=True))[:, :K],
                 target=torch.randint(0, C, (B,), generator=g))
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["logits"] = batch["logits"].to(dtype).requires_grad_()
    return batch


def _device_batch(B, C, M, K, device, dtype):
    """ferkd_loss's positional inputs made on `device` (seconds at 16,384 x 21,843, where _bench_batch's CPU
    argsort takes minutes); top-k ids may repeat, which the kernel sums as it must."""
    g = torch.Generator(device).manual_seed(0)
    w = torch.rand(B, M, K + 1, generator=g, device=device)
    return ((torch.randn(B, C, generator=g, device=device) * 3).to(dtype),
            torch.randint(0, C, (B, M, K), generator=g, device=device), (w / w.sum(2, keepdim=True))[..., :K],
            torch.rand(B, M, generator=g, device=device), torch.randint(0, C, (B,), generator=g, device=device),
            torch.full((B, M), 1 / M, device=device))


def _time_ms(fns, reps, sync=lambda: None):
    """Median wall time (ms) of each fn, called in interleaved rounds: load from other jobs hits all alike."""
    times = [[] for _ in fns]
    for _ in range(reps + 3):                                     # 3 warm-up rounds: allocator, caches
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return [sorted(ts[3:])[reps // 2] * 1e3 for ts in times]


def _loss_and_grad(fn, x, **kw):
    """fn's loss and its gradient by autograd (the torch definition, or FKD's dense way)."""
    logits = x[0].detach().requires_grad_()
    loss = fn(logits, *x[1:], **kw)
    return loss, torch.autograd.grad(loss, logits)[0]


def benchmark(reps=100):
    """CPU: the definition (ferkd_loss on CPU) against FKD's dense target, same loss; then CUDA: the Triton
    kernel against the definition, eager and compiled."""
    fkd = dict(t_low=0.0, t_mid=0.0, t_top=1.0, eps=0.0)          # plain FKD: both ways compute the same loss
    ferkd = dict(t_low=0.2, t_mid=0.5, t_top=0.9, eps=0.1)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"\nCPU, fp32 logits, loss + gradient, K=5, median of {reps} interleaved calls after 3 warm-up "
          "rounds")
    print("| B | C | FKD dense target, M=1 (ms) | ferkd_loss FKD, M=1 (ms) | ferkd_loss FerKD + SelfMix, M=2 "
          "(ms) |")
    print("|---|---|---|---|---|")
    for B, C in [(256, 1000), (256, 10), (256, 22000)]:
        x = _bench_batch(B, C, 5, "cpu", torch.float32)
        ones = torch.ones(B, 1)
        one = (x["logits"], x["topk_idx"][:, None], x["topk_prob"][:, None], ones, x["target"], ones)
        two = (x["logits"], x["topk_idx"][:, None].repeat(1, 2, 1), x["topk_prob"][:, None].repeat(1, 2, 1),
               torch.rand(B, 2), x["target"], torch.full((B, 2), 0.5))
        fns = [lambda: _loss_and_grad(fkd_dense_loss, one[:1] + (x["topk_idx"], x["topk_prob"])),
               lambda: _loss_and_grad(ferkd_loss, one, **fkd),
               lambda: _loss_and_grad(ferkd_loss, two, **ferkd)]
        torch.testing.assert_close(fns[0]()[0], fns[1]()[0])      # the same loss, timed two ways
        ms = _time_ms(fns, reps)
        print(f"| {B} | {C} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} |")

    if not torch.cuda.is_available():
        print("\nno CUDA device: the Triton kernel was not timed")
        return
    print(f"\n{torch.cuda.get_device_name()}, bf16 logits, M=2, K=10: the kernel alone (triton.testing.do_bench,"
          " median) against a copy of the logits into a gradient-sized buffer (the bound: the kernel reads the "
          "logits twice, writes the gradient once); then the whole op, the definition and its compiled form")
    print("| B | C | kernel (ms) | kernel GB/s, logits read + grad written | copy GB/s | kernel / copy | "
          "op (ms) | definition (ms) | compiled (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    compiled = torch.compile(ferkd_loss_torch)
    for B, C in [(4096, 1000), (16384, 1000), (1024, 21843), (16384, 21843)]:
        r = kernel_vs_copy(B, C)
        args = _device_batch(B, C, 2, 10, "cuda", torch.bfloat16)
        fns = [lambda: ferkd_loss_triton(*args, **ferkd)] + \
              [lambda f=f: _loss_and_grad(f, args, **ferkd) for f in (ferkd_loss_torch, compiled)]
        ms = [triton.testing.do_bench(fn, return_mode="median") for fn in fns]
        print(f"| {B} | {C} | {r['kernel_ms']:.4f} | {r['kernel_gbps']:.0f} | {r['copy_gbps']:.0f} | "
              f"{r['kernel_gbps'] / r['copy_gbps']:.2f} | {ms[0]:.4f} | {ms[1]:.4f} | {ms[2]:.4f} |")


def kernel_sweep(B, C, dtype=torch.bfloat16, M=2, K=10, device="cuda",
                 timer=lambda fn: triton.testing.do_bench(fn, return_mode="median")):
    """The kernel alone at other (block_c, num_warps) than the defaults, for the GPU check to choose them from
    measurements: [dict(block_c, num_warps, kernel_ms, grad_err_of_max)], the error against the default
    launch's gradient (a variant that fails to compile gets its error instead). Wider rows also try one block of up to
    32,768 columns (the row read once, kept in registers by 16 or 32 warps). `timer(fn)` -> ms."""
    args = _device_batch(B, C, M, K, device, dtype)
    weights = kernel_weights(args[3], args[5], t_low=0.2, t_mid=0.5, t_top=0.9)
    run = functools.partial(kernel_launch, *args[:3], weights[0], weights[1], args[4], weights[2], eps=0.1,
                            temperature=1.0)
    launch, _, want = run()
    launch()
    wide = triton.next_power_of_2(C)
    configs = ([(wide, w) for w in (1, 2, 4, 8, 16)] if wide <= 4096 else
               [(b, w) for b in (2048, 4096, 8192) for w in (4, 8, 16)] +
               [(wide, w) for w in (16, 32) if wide <= 32768])
    out = []
    for block_c, num_warps in configs:
        try:
            launch, _, grad = run(block_c=block_c, num_warps=num_warps)
            launch()
            err = float((grad.float() - want.float()).abs().max() / want.float().abs().max())
            out.append(dict(block_c=block_c, num_warps=num_warps, grad_err_of_max=err,
                            kernel_ms=round(timer(launch), 5)))
        except Exception as e:  # e.g. out of registers or shared memory: reported, not fatal
            out.append(dict(block_c=block_c, num_warps=num_warps, error=str(e).splitlines()[0][:200]))
    return out


def kernel_vs_copy(B, C, M=2, K=10, dtype=torch.bfloat16, device="cuda"):
    """The kernel alone on (B, C) logits, median ms by triton.testing.do_bench (its L2 flush between calls), and
    its GB/s counting the logits read once and the gradient written, against a device copy of the same bytes
    (logits -> gradient buffer): dict(kernel_ms, kernel_gbps, copy_gbps)."""
    args = _device_batch(B, C, M, K, device, dtype)
    weights = kernel_weights(args[3], args[5], t_low=0.2, t_mid=0.5, t_top=0.9)
    launch, _, grad = kernel_launch(*args[:3], weights[0], weights[1], args[4], weights[2], eps=0.1,
                                    temperature=1.0)
    nbytes = args[0].numel() * args[0].element_size() + grad.numel() * grad.element_size()
    kernel_ms = triton.testing.do_bench(launch, return_mode="median")
    out = torch.empty_like(args[0])
    copy_ms = triton.testing.do_bench(lambda: out.copy_(args[0]), return_mode="median")
    copy_bytes = 2 * args[0].numel() * args[0].element_size()
    return dict(kernel_ms=kernel_ms, kernel_gbps=nbytes / kernel_ms / 1e6, copy_gbps=copy_bytes / copy_ms / 1e6)


if __name__ == "__main__":
    benchmark()
