"""Host side of the v2 CUDA kernels on CPU: version switch, launch shapes, window sizes, cached plans.

The kernels themselves need a GPU (tests/test_kernels_cuda.py); here :func:`prepare` builds exactly what a launch
gets (plan and packed values) from CPU tensors, and the plan emulator runs it against the dense reference.
"""

import pytest
import torch

from dynadiag.functional import place_diagonals
from dynadiag.kernels import cuda_v2
from dynadiag.kernels.plan import emulate_apply


def _problem(in_f, out_f, k, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randperm(max(in_f, out_f), generator=gen)[:k].sort().values
    values = torch.randn(k, min(in_f, out_f), generator=gen, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=gen, dtype=torch.float64)
    return x, values, offsets


def test_kernel_version_defaults_to_v1_and_rejects_typos(monkeypatch):
    monkeypatch.delenv(cuda_v2.KERNELS_ENV, raising=False)
    assert cuda_v2.kernel_version() == "v1"
    monkeypatch.setenv(cuda_v2.KERNELS_ENV, "V2")
    monkeypatch.setattr(cuda_v2, "_WARNED", False)
    with pytest.warns(UserWarning, match="not been validated on a GPU"):
        assert cuda_v2.kernel_version() == "v2"
    assert cuda_v2.kernel_version() == "v2"  # warned once
    monkeypatch.setenv(cuda_v2.KERNELS_ENV, "v3")
    with pytest.raises(ValueError, match="v1' or 'v2"):
        cuda_v2.kernel_version()


def test_launch_shapes_and_window_sizes():
    assert cuda_v2.launch_shape(197, torch.float32) == cuda_v2.LaunchShape(128, 1, 4)  # batch-1 path
    assert cuda_v2.launch_shape(12608, torch.bfloat16) == cuda_v2.LaunchShape(128, 4, 1)
    assert cuda_v2.launch_shape(12608, torch.float64).tile == 64
    # H200: 227 KiB per block, 228 KiB per SM -> about 113 KiB per block for two blocks, two buffers.
    big = cuda_v2.window_limit(cuda_v2.LaunchShape(128, 4, 1), torch.float32, 227 * 1024, 228 * 1024)
    assert big == (113 * 1024) // 2 // ((32 + 4) * 4)
    small = cuda_v2.window_limit(cuda_v2.LaunchShape(128, 1, 4), torch.float32, 227 * 1024, 228 * 1024)
    assert small > big  # 8-token columns are narrower, even after the split-reduction buffer
    assert cuda_v2.window_limit(cuda_v2.LaunchShape(128, 4, 1), torch.float32, 1024, 1024) == 128


@pytest.mark.parametrize(("in_f", "out_f", "k", "n"), [(768, 768, 77, 5), (768, 768, 77, 2100), (768, 3072, 308, 3)])
def test_prepared_launch_computes_forward_and_grad_x(in_f, out_f, k, n):
    x, values, offsets = _problem(in_f, out_f, k, n)
    weight = place_diagonals(values, offsets, in_f, out_f)
    plan, vpack, shape = cuda_v2.prepare(x, values, offsets, out_f, tall=out_f >= in_f)
    assert shape == cuda_v2.launch_shape(n, x.dtype) and vpack.shape == (plan.shifts.numel(), shape.tile)
    assert torch.allclose(emulate_apply(x, vpack, plan), x @ weight.T, atol=1e-10)
    grad_y = torch.randn(n, out_f, dtype=torch.float64)
    plan_t, vpack_t, _ = cuda_v2.prepare(grad_y, values, offsets, in_f, tall=not out_f >= in_f)
    assert torch.allclose(emulate_apply(grad_y, vpack_t, plan_t), grad_y @ weight, atol=1e-10)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("tokens", [8, 16, 32])
def test_apply_pitch_makes_the_16_byte_shared_loads_conflict_free(itemsize, tokens):
    """A warp's 16-byte loads run in quarter-warp phases of 8 lanes at consecutive columns: conflict-free iff
    the 8 addresses fall in 8 distinct 16-byte bank groups (mod 128 bytes). 16-bit at 8 tokens had a 32-byte pitch:
    4-way conflicts."""
    pitch = cuda_v2.apply_pitch(tokens, itemsize) * itemsize
    assert pitch >= tokens * itemsize and pitch % 16 == 0 and pitch <= tokens * itemsize + 16
    for lane0 in range(0, 32, 8):
        groups = {((lane0 + lane) * pitch // 16) % 8 for lane in range(8)}
        assert len(groups) == 8, f"{8 // len(groups)}-way bank conflict at pitch {pitch} bytes"


def test_apply_falls_back_to_v1_where_the_window_does_not_fit(monkeypatch):
    """A GPU with too little shared memory per block for even one tile of v2 staging: v1 computes the primitive."""
    from dynadiag.kernels.cpu import load_cpu_library

    load_cpu_library()  # the v1 ops on CPU tensors stand in for the GPU's v1 kernels
    monkeypatch.setattr(cuda_v2, "_smem", lambda device: (16 * 1024, 32 * 1024))
    monkeypatch.setattr(cuda_v2, "_FALLBACK_WARNED", set())
    for in_f, out_f in ((300, 300), (100, 300), (300, 120)):  # shapes of distinct primitives: one warning each
        x, values, offsets = _problem(in_f, out_f, 30, 5)
        weight = place_diagonals(values, offsets, in_f, out_f)
        with pytest.warns(UserWarning, match="takes the v1 kernel"):
            y = cuda_v2.apply(x, values, offsets, out_f, tall=out_f >= in_f)
        assert torch.allclose(y, x @ weight.T, atol=1e-10)
        grad_y = torch.randn(5, out_f, dtype=torch.float64)
        with pytest.warns(UserWarning, match="takes the v1 kernel"):
            grad_x = cuda_v2.apply(grad_y, values, offsets, in_f, tall=not out_f >= in_f)
        assert torch.allclose(grad_x, grad_y @ weight, atol=1e-10)


def test_plans_are_cached_per_offsets_version_and_checked():
    x, values, offsets = _problem(40, 40, 6, 3)
    first = cuda_v2.prepare(x, values, offsets, 40, tall=True)[0]
    assert cuda_v2.prepare(x, values * 2, offsets, 40, tall=True)[0] is first  # new values: same plan
    with torch.no_grad():
        offsets[0] = offsets[1]  # in-place: the version changes, the plan is rebuilt, and the offsets rechecked
    with pytest.raises(ValueError, match="strictly ascending"):
        cuda_v2.prepare(x, values, offsets, 40, tall=True)


# ---- CPU mirrors of the v2 kernels' index arithmetic (csrc/cuda/diag_kernels_v2.cu), statement for statement:
# shared memory as a NaN-poisoned flat array with the kernels' pitches and buffer offsets, the stage counters, the
# prefetch of stage s + 1 into the other buffer before stage s computes, the per-thread (lane, warp) loads and the
# fixed-order split reduction. A wrong offset, pitch, shift or buffer index reads NaN or another stage's data.
def _mirror_apply(src, vpack, plan, warps_tokens, ksplit, grid_y, itemsize=None):
    """``itemsize=2`` runs the 16-bit kernels' staging (four tokens of a column per thread) and pitch."""
    n_tok, a_cols = src.shape
    b_cols, period, tile = plan.B, plan.L, plan.tile
    tr, km = tile // 32, 8
    bm = warps_tokens * km
    itemsize = itemsize or src.element_size()
    sp = cuda_v2.apply_pitch(bm, itemsize)
    wbuf = plan.max_window
    dst = torch.full((n_tok, b_cols), float("nan"), dtype=src.dtype)
    lanes = torch.arange(32)
    for bx in range(plan.tile_chunks.numel() - 1):
        r0 = bx * tile
        cb = int(plan.tile_chunks[bx])
        nchunk = int(plan.tile_chunks[bx + 1]) - cb
        ntt = (n_tok + bm - 1) // bm
        for by in range(grid_y):
            my_tt = (ntt - 1 - by) // grid_y + 1 if by < ntt else 0
            smem = torch.full((2 * wbuf * sp,), float("nan"), dtype=src.dtype)
            acc = torch.zeros(warps_tokens * ksplit, 32, km, tr, dtype=src.dtype)  # [threadIdx.y, lane, m, j]

            def stage(buf, chunk, n0, smem=smem):
                _, _, w0, width = chunk
                step = 4 if itemsize == 2 else 1  # store4_16: tokens m..m+3 of a column, one 8-byte store
                for m in range(0, bm, step):
                    for i in range(width):
                        col = w0 + i
                        if period < tile:
                            col %= period
                        elif col >= period:
                            col -= period
                        at = buf * wbuf * sp + i * sp + m
                        assert i * sp + m >= 0 and i * sp + m + step <= wbuf * sp and (at * itemsize) % (2 * step) == 0
                        for q in range(step):
                            n = n0 + m + q
                            ok = n < n_tok and col < a_cols
                            smem[at + q] = _checked_read(src, n, col) if ok else 0

            def write(tt, acc=acc, r0=r0, by=by):
                for ty in range(0, warps_tokens * ksplit, ksplit):  # ks == 0 threads
                    tw = ty // ksplit
                    n_base = (by + tt * grid_y) * bm + tw * km
                    for m in range(km):
                        for j in range(tr):
                            r = r0 + lanes + 32 * j
                            ok = (r < b_cols) & (n_base + m < n_tok)
                            if n_base + m < n_tok:
                                dst[n_base + m, r[ok]] = acc[ty, ok, m, j]
                acc.zero_()

            if nchunk == 0:
                for tt in range(my_tt):
                    write(tt)
                continue
            stages = my_tt * nchunk
            if stages > 0:
                stage(0, plan.chunks[cb].tolist(), by * bm)
            tt, ch = 0, 0
            tt1, ch1 = (1, 0) if nchunk == 1 else (0, 1)
            for s in range(stages):
                if s + 1 < stages:
                    stage((s + 1) & 1, plan.chunks[cb + ch1].tolist(), (by + tt1 * grid_y) * bm)
                chunk = plan.chunks[cb + ch].tolist()
                base = (s & 1) * wbuf * sp
                for ty in range(warps_tokens * ksplit):
                    tw, ks = ty // ksplit, ty % ksplit
                    for e in range(chunk[0] + ks, chunk[1], ksplit):
                        sh = int(plan.shifts[e])
                        for j in range(tr):
                            v = vpack[e, lanes + 32 * j]  # [32]
                            col = sh + lanes + 32 * j
                            assert int(col.max()) < wbuf, "entry reads past the staging buffer"
                            x = smem[base + col[:, None] * sp + tw * km + torch.arange(km)[None, :]]  # [32, 8]
                            acc[ty, :, :, j] += v[:, None] * x
                if ch == nchunk - 1:
                    for ty in range(0, warps_tokens * ksplit, ksplit):
                        for q in range(1, ksplit):  # fixed order, as the kernel adds red[q - 1]
                            acc[ty] += acc[ty + q]
                            acc[ty + q].zero_()
                    write(tt)
                tt, ch = tt1, ch1
                ch1 += 1
                if ch1 == nchunk:
                    ch1, tt1 = 0, tt1 + 1
    return dst


@pytest.mark.parametrize(
    ("in_f", "out_f", "k", "n"), [(40, 40, 6, 21), (20, 70, 9, 40), (70, 20, 9, 17), (5, 37, 3, 9)]
)
@pytest.mark.parametrize(
    ("warps", "ksplit", "grid_y", "itemsize"), [(1, 4, 1, None), (1, 4, 2, 2), (4, 1, 1, None), (4, 1, 3, 2)]
)
def test_apply_kernel_index_mirror_matches_reference(in_f, out_f, k, n, warps, ksplit, grid_y, itemsize):
    from dynadiag.kernels.plan import pack_values, plan_apply

    x, values, offsets = _problem(in_f, out_f, k, n)
    weight = place_diagonals(values, offsets, in_f, out_f)
    grad_y = torch.randn(n, out_f, dtype=torch.float64)
    for src, a_cols, b_cols, tall, want in [
        (x, in_f, out_f, out_f >= in_f, x @ weight.T),
        (grad_y, out_f, in_f, not out_f >= in_f, grad_y @ weight),
    ]:
        for wmax in (128, 1000):  # windowed chunks and whole rows
            plan = plan_apply(offsets, a_cols, b_cols, tall, 128, wmax)
            got = _mirror_apply(src, pack_values(values, plan), plan, warps, ksplit, grid_y, itemsize)
            assert torch.allclose(got, want, atol=1e-12)


def _checked_read(mat, n, col):
    """``mat[n, col]`` the way the kernel reads it (``base + n * cols + col``), raising on a read outside the row.

    The kernel addresses rows of a flat buffer, so a column past the row silently reads the next token's row (and
    past the tensor on the last token); the 2-D index here would wrap negative columns instead, hence the check.
    """
    rows, cols = mat.shape
    if not (0 <= n < rows and 0 <= col < cols):
        raise IndexError(f"kernel read out of bounds: row {n} of {rows}, column {col} of {cols}")
    return mat.reshape(-1)[n * cols + col]


def _mirror_sddmm(s_mat, q_mat, offsets, num_sms=4):
    """sddmm_v2_config + sddmm_v2_kernel: partial [slices, K, D], then the fixed-order sum over slices."""
    n_tok, d_len = s_mat.shape
    m_len = q_mat.shape[1]
    k_count = offsets.numel()
    ttk, tt, bt, bn = 8, 4, 128, 4
    cdiv = lambda a, b: (a + b - 1) // b  # noqa: E731
    k_tiles = cdiv(k_count, 8 * ttk)
    kb = cdiv(cdiv(k_count, k_tiles), ttk) * ttk
    gx, gy = cdiv(d_len, bt), cdiv(k_count, kb)
    slices = max(1, (2 * num_sms) // (gx * gy))
    slices = min(slices, max(1, n_tok // 64), 65535)
    per_slice = cdiv(cdiv(n_tok, slices), bn) * bn
    gz = cdiv(n_tok, per_slice)
    wbuf = 2 * bt + m_len - 1
    partial = torch.full((gz, k_count, d_len), float("nan"), dtype=s_mat.dtype)
    lanes = torch.arange(32)
    for bz in range(gz):
        for by in range(gy):
            for bx in range(gx):
                t0, k0 = bx * bt, by * kb
                k1 = min(k_count, k0 + kb)
                nb, ne = bz * per_slice, min(n_tok, bz * per_slice + per_slice)
                p_first = int(offsets[k0])
                width = int(offsets[k1 - 1]) - p_first + bt
                w0 = t0 + p_first
                if w0 >= m_len:
                    w0 -= m_len
                smem = torch.full((2 * wbuf * bn,), float("nan"), dtype=s_mat.dtype)
                threads_y = kb // ttk
                base = torch.zeros(threads_y, ttk, dtype=torch.long)
                for ty in range(threads_y):
                    for i in range(ttk):
                        kk = k0 + ty * ttk + i
                        base[ty, i] = int(offsets[kk]) - p_first if kk < k1 else 0
                acc = torch.zeros(threads_y, ttk, tt, 32, dtype=s_mat.dtype)

                def stage(buf, n0, smem=smem, ne=ne, t0=t0, w0=w0, width=width):
                    for q in range((bt + width) * bn):
                        m, i = q & (bn - 1), q >> 2
                        n = n0 + m
                        val = 0.0
                        if n < ne:
                            if i < bt:
                                if t0 + i < d_len:
                                    val = _checked_read(s_mat, n, t0 + i)
                            else:
                                col = w0 + (i - bt)
                                if m_len < bt:
                                    col %= m_len
                                else:
                                    col = col - m_len if col >= m_len else col
                                    col = col - m_len if col >= m_len else col
                                val = _checked_read(q_mat, n, col)
                        assert q < wbuf * bn
                        smem[buf * wbuf * bn + q] = val

                stages = cdiv(ne - nb, bn) if ne > nb else 0
                if stages > 0:
                    stage(0, nb)
                for s in range(stages):
                    if s + 1 < stages:
                        stage((s + 1) & 1, nb + (s + 1) * bn)
                    buf = (s & 1) * wbuf * bn
                    sv = torch.stack(
                        [smem[buf + ((lanes + 32 * j) * bn)[:, None] + torch.arange(bn)] for j in range(tt)]
                    )
                    for ty in range(threads_y):
                        for i in range(ttk):
                            for j in range(tt):
                                qv = smem[buf + ((bt + base[ty, i] + lanes + 32 * j) * bn)[:, None] + torch.arange(bn)]
                                acc[ty, i, j] += (sv[j] * qv).sum(1)
                for ty in range(threads_y):
                    for i in range(ttk):
                        kk = k0 + ty * ttk + i
                        for j in range(tt):
                            t = t0 + lanes + 32 * j
                            ok = t < d_len
                            if kk < k1:
                                partial[bz, kk, t[ok]] = acc[ty, i, j, ok]
    return partial.sum(0)


@pytest.mark.parametrize(
    ("in_f", "out_f", "k", "n", "offsets"),
    [
        (40, 130, 9, 70, None),
        (130, 40, 9, 131, None),
        (33, 33, 33, 9, None),
        # M >= 128 with D % 128 != 0 and an offset span wider than M - 128: the Q window of the last position block
        # runs past 2M, which one conditional subtraction left past the row (and past Q on the last token).
        (200, 200, 2, 6, [10, 190]),
        (150, 300, 3, 5, [0, 7, 290]),
        (300, 150, 3, 5, [1, 150, 299]),
    ],
)
def test_sddmm_kernel_index_mirror_matches_reference(in_f, out_f, k, n, offsets):
    from dynadiag.functional import diag_index

    x, _values, drawn = _problem(in_f, out_f, k, n)
    offsets = drawn if offsets is None else torch.tensor(offsets)
    grad_y = torch.randn(n, out_f, dtype=torch.float64)
    rows, cols = diag_index(in_f, out_f, offsets)
    tall = out_f >= in_f
    got = _mirror_sddmm(x if tall else grad_y, grad_y if tall else x, offsets)  # as diag_bwd_v_v2 calls it
    assert torch.allclose(got, (grad_y.T @ x)[rows, cols], atol=1e-10)
