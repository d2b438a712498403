"""Fused FKD / FerKD soft-label loss: Triton kernel on CUDA, a sparse pure-torch path on CPU (and as oracle).

    from kernels_triton import ferkd_loss, region_category
    loss = ferkd_loss(logits, topk_idx, topk_prob, p_gt, target, mix,
                      t_low=0.2, t_mid=0.5, t_top=0.9, eps=0.1)   # FerKD; t_low=t_mid=0, t_top=1 is plain FKD
    loss.backward()
    python kernels_triton.py                                      # benchmark (see __main__)

The (B, C) soft target is never built: each row's target is a constant plus M*K + 1 sparse entries, so the
loss and its gradient need one pass over the logits for the log-sum-exp and one to write the gradient. The
gradient is computed in the forward pass (the loss is terminal, as in Liger-Kernel's cross-entropy) and scaled
in place by the upstream gradient in backward.

Measured (`python kernels_triton.py`, 2-core AMD EPYC (AVX-512), torch 2.14.1, loss + backward, B=256, M=1,
K=5, fp32, median of 100 interleaved calls), the CPU torch path vs FKD's dense target, 5 runs with
MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=134217728 in the environment: C=1000 0.99-1.01x (0.32
vs 0.32 ms, 1 thread), 0.80-0.92x (2 threads); C=10 0.80x (0.12 vs 0.10 ms), 0.65x; C=22k 1.3-1.5x. Without
those settings glibc's malloc can hand the dense way's freed 1 MB buffers back to the kernel and fault them in
again (160-240 minor faults per call, measured with getrusage), in some runs and not in others: its time is
then bimodal (0.32 or 0.65-0.86 ms at C=1000) and the ratio ~1x or 1.9-2.2x (1 thread), 2.4-3.3x at C=22k
(7 runs). Peak memory: one (B, C) fp32 buffer instead of three (1.0 vs 2.9 MB at C=1000). Up to C=1000 both
ways make about as many passes over (B, C), softmax dominating; what is left is ~35 eager ops on
(B, M*K)-sized tensors (~2 us each) and the autograd.Function (~25 us), which the dense way's ~8 ops and C++
backward do not pay. Compiled (torch.compile of the torch path inside the same autograd.Function, inductor's
C++ on CPU; 1 thread, one run on a busy machine, 200 interleaved calls): 1.62x the dense way at C=1000, 1.24x
at C=10, 2.0x at C=22k, and only 1.09-1.25x when the dense way is compiled too: the 3x of the issue is not
reached on this CPU, eager or compiled. No GPU timing of the kernel yet.

Legend: B rows, C classes, M regions mixed into a row (SelfMix; M=1 without it), K teacher top-k per region,
T temperature, z = logits / T, s = softmax(z), I/P = teacher top-k classes/probabilities, p = teacher
probability of the ground-truth class t of a region, a = mixing weights.

Target of region m (FKD's marginal smoothing + FerKD's calibration by p, thresholds t_low <= t_mid <= t_top):
    q_m    = P_mk on I_mk, u_m = (1 - sum_k P_mk) / (C - K) on every other class           (u_m = 0 if C = K)
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

import time

import torch
import triton
import triton.language as tl

TINY = torch.finfo(torch.float32).tiny                           # smallest normal fp32

# ------------------------------------------------------------------------------------------------------------
# Reference: the calibration rule and the sparse torch path (CPU implementation, and the oracle of the kernel)
# ------------------------------------------------------------------------------------------------------------


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


def _softmax_lse(z):
    """softmax(z) and the log-sum-exp of each row, both over dim 1.

    torch.softmax is the cheapest exp on CPU (1.5x faster than torch.exp at C=1000, measured), but PyTorch's
    kernel falls back to a scalar loop on rows shorter than a 16-float vector (3-5x slower at C=10 than at
    C=32, measured): below C=32 four eager ops are faster, and they give the log-sum-exp for free.
    """
    if z.shape[1] < 32:
        m = z.amax(1, keepdim=True)                               # (B, 1)
        s = (z - m).exp_()                                        # (B, C) unnormalized
        d = s.sum(1, keepdim=True)                                # (B, 1) >= 1
        return s.div_(d), m + d.log()
    s = torch.softmax(z, 1)                                       # (B, C)
    return s, z.amax(1, keepdim=True) - s.amax(1, keepdim=True).log()  # max s = exp(max z - lse) >= 1/C


def ferkd_loss_reference(logits, topk_idx, topk_prob, p_gt, target, mix, *, t_low, t_mid, t_top, eps,
                         temperature=1.0):
    """Pure-torch (loss, d loss / d logits) with no (B, C) target: ~35 eager ops, of which 6 touch (B, C).

    Each region's target is a background b_m on every class plus K sparse entries v_mk at classes i_mk:
    soft: b = u_m, v = P - u_m at I_m; hard: b = e, v = (1 - eps - e, 0, ..., 0) at (t, t, ..., t). Mixed with
    a^: U = sum_m a^_m b_m and V = a^ v, at M*K (possibly repeated) classes. Signs are flipped (nU = -U,
    nV = -V) so that the loss is one dot product and the gradient two in-place passes and a scatter-add.
    """
    B, C = logits.shape
    M, K = topk_idx.shape[1:]
    T = temperature
    a, kept = region_weights(p_gt, mix, t_low, t_top)
    a = a[..., None]                                              # (B, M, 1)
    P = topk_prob.float()                                         # (B, M, K)
    inv_rest = 1.0 / (C - K) if C > K else 0.0                    # C = K: top-k covers every class, no spread
    nb = (P.sum(2, keepdim=True) - 1.0) * inv_rest                # (B, M, 1) -u_m
    nv, idx = (P + nb).neg_(), topk_idx                           # (B, M, K) -(P - u_m) at the top-k classes
    if t_mid > t_low:                                             # else no hard region (FKD, FerKD's default)
        e = eps / (C - 1)                                         # hard region's mass on each wrong class
        hard = (p_gt.float() < t_mid)[..., None]                  # (B, M, 1) where a > 0: hard region
        nb = torch.where(hard, -e, nb)
        nv = torch.where(hard, P.new_tensor([e + eps - 1.0] + [0.0] * (K - 1)), nv)
        idx = torch.where(hard, target.view(B, 1, 1), idx)
    nU = (a * nb).sum(1)                                          # (B, 1)
    nV = (a * nv).view(B, M * K)                                  # (B, M*K)
    idx = idx.reshape(B, M * K).long()                            # (B, M*K) may repeat classes
    z = logits.float() if T == 1 else logits.float() / T          # (B, C)
    s, lse = _softmax_lse(z)                                      # (B, C), (B, 1)
    # sum_c y_c is 1 on kept rows (u_m spreads the rest of the teacher's mass), unless C = K: sum_k P_mk there
    y_sum = kept if C > K else -(nU * C + nV.sum(1, keepdim=True))  # (B, 1)
    # sum_b CE_b = sum_b (y_sum_b lse_b - U_b sum_c z_bc - sum_j V_bj z_b,idx_bj): one dot product, of rows
    # already scaled by the gradient's T / N (the loss's T^2 / N is one more T)
    w = torch.cat([y_sum, nU, nV], 1) / (kept.sum().clamp_min(1.0) / T)  # (B, 2 + M*K) N: a tensor, no sync
    zz = torch.cat([lse, z.sum(1, keepdim=True), z.gather(1, idx)], 1)   # (B, 2 + M*K)
    loss = torch.dot(w.view(-1), zz.view(-1)) * T
    grad = s.mul_(w[:, :1]).add_(w[:, 1:2])                       # (B, C) in place: T (s y_sum - U) / N
    grad.scatter_add_(1, idx, w[:, 2:])                           # scatter-add: repeated classes accumulate
    return loss, grad.to(logits.dtype)


# ------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per row; pass 1 = online log-sum-exp, pass 2 = gradient, then the sparse entries
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _ferkd_loss_kernel(
    logits_ptr,   # (B, C) student logits (fp32/bf16/fp16), rows `stride_row` apart, columns contiguous
    grad_ptr,     # (B, C) out: d loss / d logits, contiguous, logits dtype
    loss_ptr,     # (B,) out, fp32: T^2 CE_b / N, summed by the launcher (deterministic: no atomics)
    idx_ptr,      # (B, M, K) teacher top-k class ids (any int dtype), contiguous
    prob_ptr,     # (B, M, K) teacher top-k probabilities, contiguous
    w_soft_ptr,   # (B, M) fp32 renormalized weight of each soft region (0 if the region is hard or dropped)
    w_hard_ptr,   # (B, M) fp32 renormalized weight of each hard region
    target_ptr,   # (B,) ground-truth class (any int dtype)
    norm_ptr,     # () fp32 N = max(#kept rows, 1), read on device so that the host never waits
    stride_row, C, eps, e, inv_rest, inv_t, t,   # e = eps/(C-1); inv_rest = 1/(C-K) or 0 if C = K
    M: tl.constexpr, K: tl.constexpr, M_P: tl.constexpr, K_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)                             # int64: b * stride_row may exceed 2^31
    row = logits_ptr + b * stride_row
    grad_row = grad_ptr + b * C

    # Sparse target of this row (module docstring): U + V on the top-k classes + H on the true class.
    r = tl.arange(0, M_P)[:, None]                                # (M_P, 1) region
    k = tl.arange(0, K_P)[None, :]                                # (1, K_P) top-k slot
    rk = (r < M) & (k < K)
    I = tl.load(idx_ptr + b * (M * K) + r * K + k, mask=rk, other=-1).to(tl.int64)
    P = tl.load(prob_ptr + b * (M * K) + r * K + k, mask=rk, other=0.0).to(tl.float32)
    ws = tl.load(w_soft_ptr + b * M + r, mask=r < M, other=0.0)   # (M_P, 1)
    wh = tl.load(w_hard_ptr + b * M + r, mask=r < M, other=0.0)   # (M_P, 1)
    u = (1.0 - tl.sum(P, axis=1)[:, None]) * inv_rest             # (M_P, 1)
    U = tl.sum(ws * u) + tl.sum(wh) * e
    H = tl.sum(wh) * (1.0 - eps - e)
    V = tl.reshape(tl.where(rk, ws * (P - u), 0.0), (M_P * K_P,))
    I = tl.reshape(I, (M_P * K_P,))                               # -1 on padding: matches no class
    tgt = tl.load(target_ptr + b).to(tl.int64)
    y_sum = U * C + tl.sum(V) + H

    # Pass 1: online log-sum-exp and sum of z over the row, in fp32.
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


def ferkd_loss_triton(logits, topk_idx, topk_prob, p_gt, target, mix, *, t_low, t_mid, t_top, eps,
                      temperature=1.0, block_c=None):
    """Same contract as ferkd_loss_reference, computed by the Triton kernel (CUDA, or TRITON_INTERPRET=1)."""
    B, C = logits.shape
    M, K = topk_idx.shape[1:]
    a, kept = region_weights(p_gt, mix, t_low, t_top)
    w_hard = torch.where(p_gt.float() < t_mid, a, 0.0)            # (B, M) 0 on soft and dropped regions
    w_soft = a - w_hard                                           # (B, M) exact: a - a = 0 on hard ones
    norm = kept.sum().clamp_min(1.0)                              # () N on device: no host sync
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = torch.empty((B, C), dtype=logits.dtype, device=logits.device)
    row_loss = torch.empty(B, dtype=torch.float32, device=logits.device)
    # Up to 4096 columns per step bounds the registers; larger C loops (C = 22k: 6 steps per pass).
    block_c = block_c or min(triton.next_power_of_2(C), 4096)
    _ferkd_loss_kernel[(B,)](
        logits, grad, row_loss, topk_idx.contiguous(), topk_prob.contiguous(),
        w_soft.contiguous(), w_hard.contiguous(), target.contiguous(), norm,
        logits.stride(0), C, eps, eps / (C - 1), 1.0 / (C - K) if C > K else 0.0, 1.0 / temperature,
        temperature, M=M, K=K, M_P=triton.next_power_of_2(M), K_P=triton.next_power_of_2(K),
        BLOCK_C=block_c, num_warps=8 if block_c >= 2048 else 4,
    )
    return row_loss.sum(), grad


# ------------------------------------------------------------------------------------------------------------
# torch.library op: CPU -> torch path, CUDA -> Triton; traced by torch.compile(fullgraph=True); opcheck-clean
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ferkd::loss_fwd", mutates_args=())
def _loss_fwd(logits: torch.Tensor, topk_idx: torch.Tensor, topk_prob: torch.Tensor, p_gt: torch.Tensor,
              target: torch.Tensor, mix: torch.Tensor, t_low: float, t_mid: float, t_top: float, eps: float,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return ferkd_loss_reference(logits, topk_idx, topk_prob, p_gt, target, mix, t_low=t_low, t_mid=t_mid,
                                t_top=t_top, eps=eps, temperature=temperature)


@_loss_fwd.register_kernel("cuda")
def _loss_fwd_cuda(logits, topk_idx, topk_prob, p_gt, target, mix, t_low, t_mid, t_top, eps, temperature):
    return ferkd_loss_triton(logits, topk_idx, topk_prob, p_gt, target, mix, t_low=t_low, t_mid=t_mid,
                             t_top=t_top, eps=eps, temperature=temperature)


@_loss_fwd.register_fake
def _loss_fwd_fake(logits, *args):
    return logits.new_empty((), dtype=torch.float32), torch.empty_like(logits)


def _loss_fwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])                              # the gradient, computed in the forward
    ctx.mark_non_differentiable(output[1])                        # no second derivative through it


def _loss_fwd_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss,) + (None,) * 10                     # nothing flows to labels or thresholds


_loss_fwd.register_autograd(_loss_fwd_backward, setup_context=_loss_fwd_setup_context)


class _EagerLoss(torch.autograd.Function):
    """The op's forward and backward, for eager calls. custom_op's Python autograd wrapper costs ~40 us a call
    with these 11 arguments (measured on CPU: more than the whole loss at C=10); a plain autograd.Function
    ~10 us. torch.compile still sees the registered op (see ferkd_loss).

    The gradient buffer is this function's alone, so backward scales it in place, as Liger-Kernel's
    cross-entropy does: one (B, C) buffer at the peak instead of two. The cost: a second backward through
    the same graph (retain_graph=True) raises autograd's "modified by an inplace operation" error."""

    @staticmethod
    def forward(ctx, logits, topk_idx, topk_prob, p_gt, target, mix, t_low, t_mid, t_top, eps, temperature):
        fwd = ferkd_loss_triton if logits.is_cuda else ferkd_loss_reference  # = the op's kernels by device
        loss, grad = fwd(logits, topk_idx, topk_prob, p_gt, target, mix, t_low=t_low, t_mid=t_mid,
                         t_top=t_top, eps=eps, temperature=temperature)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad.mul_(grad_loss),) + (None,) * 10             # nothing flows to labels or thresholds


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------


def ferkd_loss(logits, topk_idx, topk_prob, p_gt, target, mix, *, t_low, t_mid, t_top, eps, temperature=1.0):
    """T^2 * mean over kept rows of CE(calibrated soft target, softmax(logits / T)); see the module docstring.

    logits (B, C) fp32/bf16/fp16; topk_idx (B, M, K) int; topk_prob (B, M, K) float, dequantized; p_gt (B, M)
    float; target (B,) int; mix (B, M) float, rows summing to 1 (M=1, mix=1 without SelfMix). Returns a 0-d
    fp32 tensor; the gradient reaches logits only. t_low=0, t_mid=0, t_top=1 gives plain FKD.
    """
    B, C = logits.shape
    assert topk_idx.shape == topk_prob.shape and topk_idx.shape[0] == B, (topk_idx.shape, logits.shape)
    assert p_gt.shape == mix.shape == topk_idx.shape[:2] and target.shape == (B,), (p_gt.shape, target.shape)
    assert C >= 2 and topk_idx.shape[2] <= C and temperature > 0, (C, topk_idx.shape, temperature)
    assert t_low <= t_top, (t_low, t_top)                         # else region_weights' clamp misfiles
    args = (logits, topk_idx, topk_prob, p_gt, target, mix, float(t_low), float(t_mid), float(t_top),
            float(eps), float(temperature))
    if torch.compiler.is_compiling():                             # one opaque op in the graph: no graph break
        return torch.ops.ferkd.loss_fwd(*args)[0]
    return _EagerLoss.apply(*args)


# ------------------------------------------------------------------------------------------------------------
# Benchmark: python kernels_triton.py
# ------------------------------------------------------------------------------------------------------------


def fkd_dense_loss(logits, topk_idx, topk_prob):
    """FKD's way (M=1, T=1): expand the top-k into a dense (B, C) target, then the soft cross-entropy."""
    B, C = logits.shape
    K = topk_idx.shape[1]
    target = ((1 - topk_prob.sum(1, keepdim=True)) / (C - K)).expand(B, C).contiguous()  # (B, C)
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


def _page_faults(fn, calls=20):
    """Minor page faults per call: glibc's malloc may hand freed (B, C) buffers back to the kernel and fault
    them in again on the next call, which makes the dense way's time bimodal (see the module docstring)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _peak_cpu_bytes(fn):
    """Peak bytes of the CPU tensors created while fn runs: the tensor lifetimes behind the profiler's
    export_memory_timeline (a private module; fine for a benchmark, not for the training path)."""
    from torch.profiler._memory_profiler import Action, MemoryProfile

    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, nbytes in MemoryProfile(prof.profiler.kineto_results).timeline:
        live += {Action.CREATE: nbytes, Action.DESTROY: -nbytes}.get(action, 0)
        peak = max(peak, live)
    return peak


def benchmark(reps=100):
    """CPU: the torch path vs FKD's dense target, at each thread count from 1 to the default; then CUDA."""
    fkd = dict(t_low=0.0, t_mid=0.0, t_top=1.0, eps=0.0)          # plain FKD: both ways compute the same loss
    threads = sorted({1, torch.get_num_threads()})
    print(f"torch {torch.__version__}, triton {triton.__version__}, CPU threads {threads}")
    print(f"\nCPU, fp32 logits, loss + backward, M=1, K=5, median of {reps} interleaved calls after 3 "
          "warm-up rounds.")
    print("Peak: most bytes of CPU tensors alive at once in one call (torch.profiler's memory timeline).")
    print("Faults: minor page faults per call, after the timing (see _page_faults).")
    print("| threads | B | C | FKD dense target (ms) | ferkd_loss torch path (ms) | speed-up | peak MB: dense"
          " | ours | faults: dense | ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for B, C in [(256, 1000), (256, 10), (256, 22000)]:
        x = _bench_batch(B, C, 5, "cpu", torch.float32)
        ones = torch.ones(B, 1)
        losses = {}

        def dense():
            x["logits"].grad = None
            losses["dense"] = fkd_dense_loss(x["logits"], x["topk_idx"], x["topk_prob"])
            losses["dense"].backward()

        def ours():
            x["logits"].grad = None
            losses["ours"] = ferkd_loss(x["logits"], x["topk_idx"][:, None], x["topk_prob"][:, None], ones,
                                        x["target"], ones, **fkd)
            losses["ours"].backward()

        ms = {}
        for n in threads:
            torch.set_num_threads(n)
            ms[n] = _time_ms([dense, ours], reps)
        torch.testing.assert_close(losses["ours"], losses["dense"])  # the same loss, timed two ways
        faults = [_page_faults(fn) for fn in (dense, ours)]
        mb = [_peak_cpu_bytes(fn) / 2**20 for fn in (dense, ours)]  # thread count does not change it
        for n, (t_dense, t_ours) in ms.items():
            print(f"| {n} | {B} | {C} | {t_dense:.3f} | {t_ours:.3f} | {t_dense / t_ours:.2f}x "
                  f"| {mb[0]:.2f} | {mb[1]:.2f} | {faults[0]:.0f} | {faults[1]:.0f} |")
    torch.set_num_threads(threads[-1])

    if not torch.cuda.is_available():
        print("\nno CUDA device: the Triton kernel was not timed")
        return
    print(f"\n{torch.cuda.get_device_name()}, bf16 logits, loss + gradient, M=2, K=10, median of 100 calls "
          "(whole op: region weights, kernel, sum of row losses)")
    print("| B | C | Triton (ms) | GB/s: logits read + grad written | torch path (ms) | compiled (ms) |")
    print("|---|---|---|---|---|---|")
    compiled_ref = torch.compile(ferkd_loss_reference)
    kw = dict(t_low=0.2, t_mid=0.5, t_top=0.9, eps=0.1)
    for B, C in [(256, 1000), (1024, 1000), (4096, 1000), (256, 22000)]:
        x = _bench_batch(B, C, 10, "cuda", torch.bfloat16)
        args = (x["logits"].detach(), x["topk_idx"][:, None].repeat(1, 2, 1),
                x["topk_prob"][:, None].repeat(1, 2, 1), torch.rand(B, 2, device="cuda"), x["target"],
                torch.full((B, 2), 0.5, device="cuda"))
        fns = [lambda f=f: f(*args, **kw) for f in (ferkd_loss_triton, ferkd_loss_reference, compiled_ref)]
        ms = _time_ms(fns, 100, torch.cuda.synchronize)
        gbps = 2 * B * C * 2 / (ms[0] * 1e-3) / 1e9               # bf16: 2 bytes read + 2 written per logit
        print(f"| {B} | {C} | {ms[0]:.4f} | {gbps:.0f} | {ms[1]:.4f} | {ms[2]:.4f} |")


if __name__ == "__main__":
    benchmark()
