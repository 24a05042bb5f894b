"""Slice stack -> canonical 1 x 1 x 4 mm uint8 volume, CT windows, foreground masks.

Resampling. Each axis is resampled separately, from the true sample positions (so
non-uniform slice spacing and gantry-tilt shear, each slice shifted in-plane, are handled
exactly, not approximated). Where the input gap around an output position is >= the output
spacing (upsampling) the weights are plain linear interpolation between the two
neighbouring samples; where it is smaller (downsampling, e.g. 0.45 mm CT pixels -> 1 mm,
1 mm slices -> 4 mm) a normalised tent (triangle) kernel of half-width = output spacing
averages every input sample it covers, so nothing aliases (`scipy.ndimage.zoom(order=1)`
skips samples). Tested against scipy.ndimage.map_coordinates(order=1): equal to 1e-3 of
the range when upsampling, within 3% (max) / 0.5% (mean) when downsampling a smooth field.
Output grids are centred on the input extent; output voxels outside the input (tilted
stacks only) get the fill value (-1024 HU for CT, 0 for MR; for MONOCHROME1 MR, inverted after
resampling, the darkest value of the data: `invert_monochrome1`). The neurovfm preset resamples
as the authors' SimpleITK code does instead: cubic B-spline interpolation (bspline_matrix,
the same sparse-matrix streaming), their grid and boundary rules (resampled_neurovfm).

Memory. Each kernel is a sparse (n_out, n_in) matrix. `iter_resampled` streams: input
slices are resampled in-plane as they are read, and each output slice along the normal is
formed as soon as the few input slices under its kernel are in; `process_stack` writes it
straight into the canonical uint8 arrays (CT) or a float16 buffer (MR; float32 when values
exceed float16, or read again into float32 when float16 cannot hold the clip range to half a
level: f16_resolves) for the volume-wide percentile clip. Peak memory is about the output
(CT 3 bytes/voxel, MR ~4) plus a few slices.

Grid. Output axes are first (n, c, r) of the stack: the slice normal at 4 mm, then the two
in-plane directions at 1 mm, so an oblique series stays oblique in the affine (no
in-plane rotation, no extra interpolation). Then axes are permuted/flipped (exactly) into
the canonical orientation:
  axis 0 (D) = the acquisition axis, then the other two world axes in the order I/S, A/P,
  R/L; every axis points toward R, P or I (the reference code's RPI orientation).
  Axial series -> "IPR", coronal -> "PIR", sagittal -> "RIP" (axis codes as in
  nibabel.aff2axcodes, per array axis D, H, W). Shown as an image, volume[d] has anterior
  (axial) or superior (coronal, sagittal) at the top and the patient's right on the image
  right (neurological convention; flip W for the radiological view).
The affine maps canonical voxel (d, h, w) -> RAS world mm (an oblique series has an oblique
affine whose closest axes are the codes above).

Intensities. MR: clip to the 0.5 / 99.5th percentile of the resampled volume, scale to
0..255 (uint8, round half up). CT (Hounsfield units, clamped to [-1024, 3071] first):
window(hu, W, L, levels) = round((clip(hu, L - W/2, L + W/2) - (L - W/2)) / W * (levels-1));
channel 0 = brain W80/L40 with 256 levels; channel 1 = (blood W200/L80, 16 levels) << 4 |
(bone W2800/L600, 16 levels): blood in the high nibble, bone in the low nibble. A 4-bit
value v reads back as v * 17 (0..255).

Foreground (air removal only, no skull stripping): MR voxels above the Otsu threshold of the
uint8 volume, CT voxels above -500 HU; then holes are filled slice by slice (air in
sinuses, dark CSF stays foreground). Token mask: nvfm.tokenize.token_foreground (patch
4 x 16 x 16, a token is foreground when >= min_fg_fraction of its voxels are).
"""
import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp
import torch

from nvfm import ops
from nvfm.dicom import SeriesError, LPS_TO_RAS

# how each preset resamples, recorded as manifest["resampling"] for presets other than nvfm
# and in parts/settings.json (an output written with another value is neither resumed nor
# extended). Absent: "tent", all nvfm manifests and neurovfm ones written before its B-spline
# resampling; "bspline": neurovfm before SimpleITK parity (a sagittal series in RIP array
# order, truncation decided from the values, an unsigned MR undershoot not clamped to 0);
# "bspline-sitk": their array order and SimpleITK's pixel-type truncation / clamp
# (SliceStack.itk_pixel_type, tests/test_sitk_parity.py); "bspline-sitk2": also a gantry-tilted
# CT's sheared-away wedges as air (they were 0 HU, soft tissue) and the B-spline's overshoot at
# their border as outside the input
RESAMPLING = {"nvfm": "tent", "neurovfm": "bspline-sitk2"}

ops.register("fill_holes_slices")  # C++ kernels of this module: csrc/volume.cpp
ops.register("u16_histogram")
ops.register("u16_lookup")

SPACING = (4.0, 1.0, 1.0)  # mm along (D, H, W)
CT_WINDOWS = {"brain": (80.0, 40.0, 256), "blood": (200.0, 80.0, 16), "bone": (2800.0, 600.0, 16)}
CT_AIR_HU = -500.0
HU_RANGE = (-1024.0, 3071.0)
MR_PERCENTILES = (0.5, 99.5)
_RPI_SIGN = {0: 1, 1: -1, 2: -1}  # RAS sign each world axis points to: x -> R, y -> P, z -> I
_CODES = {0: "RL", 1: "AP", 2: "SI"}
TILT_MM = 1e-3  # in-plane shear (mm) below which a stack is resampled as untilted
FLAT_RTOL = 1e-5  # float32 resampling moves a constant input by a few ulps: a range below this is none


def tilted(stack):
    """Is the stack gantry-tilted: its slices shifted in-plane by more than TILT_MM (mm)?"""
    return bool(np.abs(stack.shear).max() > TILT_MM)


def flat_range(lo, hi):
    """Is [lo, hi] no intensity range? True when hi - lo <= FLAT_RTOL * max(|lo|, |hi|): a constant
    input resamples to values a few float32 ulps apart (7 -> 6.9999995 .. 7), not an image."""
    return not hi - lo > FLAT_RTOL * max(abs(lo), abs(hi))


def out_grid(lo, hi, s):
    """Positions (mm) of a grid with spacing s centred on [lo, hi]."""
    extent = max(hi - lo, 0.0)
    n = int(np.floor(extent / s + 1e-6)) + 1
    return lo + (extent - (n - 1) * s) / 2 + s * np.arange(n)


def tent_matrix(p_in, q_out, s_out, edge=0.0):
    """Sparse CSR (n_out, n_in) resampling weights from sorted input positions p_in (mm) to
    output positions q_out (mm) with output spacing s_out; rows sum to 1 (or 0 outside).
    Outputs up to `edge` mm past the last input count as inside (the kernel's part that is
    in; linear interpolation clamps): a reduced-resolution JPEG 2000 decode holds samples up
    to one native pixel short of the acquired image's far edge (nvfm/dicom.py)."""
    p = np.asarray(p_in, float)
    q = np.asarray(q_out, float)
    n_in = len(p)
    eps = 1e-6
    # local gap of the input interval containing each q
    idx = np.clip(np.searchsorted(p, q), 1, max(n_in - 1, 1))
    gap = (p[idx] - p[idx - 1]) if n_in > 1 else np.zeros_like(q)
    support = np.maximum(s_out, gap)
    lo = np.searchsorted(p, q - support + eps, side="left")
    hi = np.searchsorted(p, q + support - eps, side="right")
    inside = (q >= p[0] - eps) & (q <= p[-1] + edge + eps)
    # (vectorised over output rows; the same weights as a per-row loop)
    lin = inside & (gap >= s_out) if n_in > 1 else np.zeros(len(q), bool)
    tent = inside & ~lin
    # upsampling here: linear interpolation between the two neighbours
    o_l = np.nonzero(lin)[0]
    a = idx[o_l] - 1
    t = np.clip((q[o_l] - p[a]) / np.where(gap[o_l] > 0, gap[o_l], 1.0), 0.0, 1.0)
    r_l = np.repeat(o_l, 2)
    c_l = np.stack([a, a + 1], 1).ravel()
    w_l = np.stack([1.0 - t, t], 1).ravel()
    # downsampling: a tent of half-width s_out averages every sample it covers
    o_t = np.nonzero(tent)[0]
    cnt = np.maximum(hi[o_t] - lo[o_t], 0)
    r_t = np.repeat(o_t, cnt)
    start = np.repeat(np.cumsum(cnt) - cnt, cnt)
    c_t = np.repeat(lo[o_t], cnt) + (np.arange(int(cnt.sum())) - start)
    w_t = np.maximum(1.0 - np.abs(p[c_t] - q[r_t]) / support[r_t], 0)
    rows = np.concatenate([r_l, r_t])
    cols = np.concatenate([c_l, c_t]).astype(np.int64)
    w = np.concatenate([w_l, w_t])
    order = np.lexsort((cols, rows))
    rows, cols, w = rows[order], cols[order], w[order]
    tot = np.bincount(rows, weights=w, minlength=len(q))
    keep = tot[rows] > 0
    rows, cols, w = rows[keep], cols[keep], w[keep] / tot[rows[keep]]
    if not len(rows):
        return sp.csr_matrix((len(q), n_in), dtype=np.float32)
    return sp.csr_matrix((w.astype(np.float32), (rows, cols)), shape=(len(q), n_in))


def _beta3(t):
    """Cubic B-spline kernel: 2/3 - t^2 + |t|^3 / 2 for |t| < 1, (2 - |t|)^3 / 6 for |t| < 2, else 0."""
    a = np.abs(t)
    return np.where(a < 1, 2.0 / 3.0 - a * a + a ** 3 / 2.0, np.where(a < 2, (2.0 - a) ** 3 / 6.0, 0.0))


def _mirror(k, n):
    """Whole-sample mirror of integer indices into 0..n-1 (period 2n - 2: ... 2 1 | 0 1 .. n-1 | n-2 ..),
    ITK's and scipy.ndimage's mode "mirror"; every index is 0 when n == 1."""
    k = np.asarray(k)
    if n == 1:
        return np.zeros_like(k)
    per = 2 * (n - 1)
    k = np.abs(k) % per
    return np.where(k >= n, per - k, k)


def bspline_index(p_in, q_out):
    """Continuous input index of output positions q_out (mm) on sorted input positions p_in:
    (q - p0) / gap for a uniform p_in; for a non-uniform one the piecewise-linear map between
    the samples' positions and their indices (extended past the ends with the end gaps)."""
    p = np.asarray(p_in, float)
    q = np.asarray(q_out, float)
    n = len(p)
    if n == 1:
        return np.zeros_like(q)
    gaps = np.diff(p)
    if np.allclose(gaps, gaps.mean(), rtol=1e-6, atol=1e-9):
        return (q - p[0]) / ((p[-1] - p[0]) / (n - 1))
    x = np.interp(q, p, np.arange(n, dtype=float))
    x = np.where(q < p[0], (q - p[0]) / gaps[0], x)
    return np.where(q > p[-1], n - 1 + (q - p[-1]) / gaps[-1], x)


def bspline_matrix(p_in, q_out, tol=1e-10, reverse=False):
    """Sparse CSR (n_out, n_in) float32 weights of cubic B-spline interpolation (SimpleITK's
    sitkBSpline: ITK BSplineInterpolateImageFunction of order 3 on the coefficients of
    BSplineDecompositionImageFilter) from input positions p_in (mm) to output positions q_out.

    Interpolating, not smoothing: the coefficients c solve M c = f, M the (1/6, 2/3, 1/6)
    convolution with whole-sample mirror boundaries (c[-k] = c[k], c[n-1+k] = c[n-1-k]; ITK's
    and scipy.ndimage.spline_filter's mode "mirror"); the value at continuous index x is
    sum_k c[mirror(k)] beta3(x - k) over the 4 nearest k. So the weights are B(x) M^-1, one
    banded tridiagonal solve. M^-1 decays as 0.268^|i-j|: weights below `tol` (~40 inputs
    from an output) are dropped; rows sum to 1, polynomials of degree <= 3 are reproduced
    exactly away from the ends (the mirror makes the end derivative 0, so a line bends within
    a few samples of an end). Boundaries as ITK's ResampleImageFilter: an output whose index x
    is outside [-0.5, n - 0.5) gets an all-zero row (the caller's fill, their default pixel
    value); inside, the B-spline extends past the end samples by the mirror. reverse=True:
    the axis runs the other way in their (RPI) image, so the half-open interval is
    (-0.5, n - 0.5] here (an output exactly half a sample past the end is out in either
    order). Nothing is averaged when downsampling (theirs aliases; tent_matrix does not)."""
    from scipy.linalg import solve_banded
    x = bspline_index(p_in, q_out)
    n, m = len(p_in), len(x)
    inside = ((x > -0.5) & (x <= n - 0.5)) if reverse else ((x >= -0.5) & (x < n - 0.5))
    o = np.nonzero(inside)[0]
    if not len(o):
        return sp.csr_matrix((m, n), dtype=np.float32)
    base = np.floor(x[o]).astype(np.int64) - 1
    ks = base[:, None] + np.arange(4)  # the 4 coefficients under each output
    B = np.zeros((n, len(o)))  # B^T: input (coefficient) x inside output
    np.add.at(B, (_mirror(ks, n), np.broadcast_to(np.arange(len(o))[:, None], ks.shape)), _beta3(x[o][:, None] - ks))
    # M^T (banded, (1, 1)): M[i, mirror(i + d)] += beta3(d) for d = -1, 0, 1
    M = np.zeros((n, n))
    for d, w in ((-1, 1.0 / 6.0), (0, 2.0 / 3.0), (1, 1.0 / 6.0)):
        np.add.at(M, (np.arange(n), _mirror(np.arange(n) + d, n)), w)
    ab = np.zeros((3, n))  # solve_banded's layout of A = M^T: ab[1 + i - j, j] = A[i, j] = M[j, i]
    for e in (-1, 0, 1):  # i = j + e
        j = np.arange(max(0, -e), min(n, n - e))
        ab[1 + e, j] = M[j, j + e]
    W = solve_banded((1, 1), ab, B).T  # (inside outputs, n): B(x) M^-1
    W[np.abs(W) < tol] = 0.0
    rows, cols = np.nonzero(W)
    return sp.csr_matrix((W[rows, cols].astype(np.float32), (o[rows], cols)), shape=(m, n))


try:  # scipy's CSR x dense kernel, called directly: the `W @ x` operator's dispatch costs more
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs  # than the product here
except ImportError:  # pragma: no cover (a scipy without it: the public operator)
    _csr_matvecs = None


def csr_dot(W, x):
    """W (n_out, n_in) CSR float32 @ x (n_in, m) float32 -> (n_out, m) float32, C-contiguous.
    The same kernel and summation order (increasing input index per output row) as
    `W @ x` and `(x.T @ W.T).T`, so the result is bit-identical to either."""
    x = np.ascontiguousarray(x, np.float32)
    if _csr_matvecs is None or W.dtype != np.float32 or W.indices.dtype != np.int32 or W.indptr.dtype != np.int32:
        return np.ascontiguousarray(W @ x, np.float32)
    if not W.has_sorted_indices:
        W.sort_indices()
    y = np.zeros((W.shape[0], x.shape[1]), np.float32)
    _csr_matvecs(W.shape[0], W.shape[1], x.shape[1], W.indptr, W.indices, W.data, x.ravel(), y.ravel())
    return y


def _toward_lap(affine, shape):
    """Per native axis (n, c, r): does it point toward L, A or S (reversed in an RPI image)?"""
    perm, flips = canonical_transform(affine, shape)[:2]
    out = [False] * 3
    for t, a in enumerate(perm):
        out[a] = bool(flips[t])
    return out


def resample_grid(stack, spacing=SPACING, grid="centre"):
    """Output grid of a stack: positions q_n, q_c, q_r (mm, stack frame) and the affine
    output voxel (n, c, r) -> RAS mm.

    grid "centre" (nvfm): per axis floor(extent / s) + 1 positions centred on the input's
    extent. grid "origin" (the authors' SimpleITK resampling after orienting to RPI): per axis
    int(N * (spacing_in / s)) positions from the input sample that comes first in R/P/I order
    (their image origin), N the axis' sample count (in-plane: at the acquired resolution);
    a gantry-tilted stack gets as many more as cover its shear."""
    su, sv = stack.shear[:, 0], stack.shear[:, 1]
    K, R, C = stack.shape
    ext = getattr(stack, "extent", ((R - 1) * stack.ps[0], (C - 1) * stack.ps[1]))  # acquired in-plane extent
    bounds = ((0.0, float(stack.d[-1])), (su.min(), su.max() + ext[0]), (sv.min(), sv.max() + ext[1]))
    q = [out_grid(lo, hi, s) for (lo, hi), s in zip(bounds, spacing)]

    def affine(q_n, q_c, q_r):
        A = np.eye(4)
        A[:3, 0] = stack.n * spacing[0]
        A[:3, 1] = stack.c * spacing[1]
        A[:3, 2] = stack.r * spacing[2]
        A[:3, 3] = stack.o0 + q_n[0] * stack.n + q_c[0] * stack.c + q_r[0] * stack.r
        return LPS_TO_RAS @ A
    if grid == "origin":
        toward_lap = _toward_lap(affine(*q), tuple(len(x) for x in q))
        if not tilted(stack):  # untilted, as iter_resampled: rounding-level shear
            bounds = ((0.0, float(stack.d[-1])), (0.0, ext[0]), (0.0, ext[1]))  # (a float32 NIfTI affine's
            # ~1e-6 mm on an oblique series) adds no voxel and moves no origin (SimpleITK parity)
        nps = getattr(stack, "native_ps", stack.ps)
        counts = (K, int(round(ext[0] / nps[0])) + 1, int(round(ext[1] / nps[1])) + 1)
        gaps = (bounds[0][1] / (K - 1) if K > 1 else spacing[0], nps[0], nps[1])
        spans = (bounds[0][1], ext[0], ext[1])  # a gantry tilt's shear widens the in-plane bounds
        q = []
        for (lo, hi), s, n, g, span, back in zip(bounds, spacing, counts, gaps, spans, toward_lap):
            m = int(n * (g / s))  # their size: int(size * (spacing / target)), in that order
            m += int(np.ceil((hi - lo - span) / s - 1e-9))  # + the shear (theirs leaves a tilt sheared)
            i = s * np.arange(m)
            q.append(hi - i[::-1] if back else lo + i)
    elif grid != "centre":
        raise ValueError(f"grid must be 'centre' or 'origin', not {grid!r}")
    if min(len(x) for x in q) < 1:  # their int(n * spacing / target): 0 under one output voxel
        raise SeriesError("empty volume after resampling (under one output voxel along an axis)")
    return q[0], q[1], q[2], affine(*q)


def iter_resampled(stack, spacing=SPACING, fill=None, kernel="tent", grid="centre", clamp=True, on_slice=None,
                   on_fill=None):
    """Stream a SliceStack resampled to `spacing` (mm along normal, c, r).

    Yields (j, float32 (H, W)) for output slices j = 0..D-1 along the normal, in order,
    holding only the in-plane-resampled input slices under the current kernel (memory ~ a
    few slices). CT values are clamped to HU_RANGE first (unless clamp=False); fill
    defaults to -1024 (CT) or 0. kernel "tent" (tent_matrix) or "bspline" (bspline_matrix);
    grid as resample_grid; on_slice(x) sees each input slice as read (before the clamp);
    on_fill(j, bool (H, W)) is told, before slice j is yielded, which of its voxels got the
    fill value (no input under the kernel; not called when there are none).
    """
    if kernel not in ("tent", "bspline"):
        raise ValueError(f"kernel must be 'tent' or 'bspline', not {kernel!r}")

    def weights(p, q_out, s, edge=0.0, axis=0):
        return tent_matrix(p, q_out, s, edge) if kernel == "tent" else bspline_matrix(p, q_out, reverse=rev[axis])
    ct = stack.modality == "CT" and clamp
    if fill is None:
        fill = HU_RANGE[0] if stack.modality == "CT" else 0.0
    fill = np.float32(fill)
    K, R, C = stack.shape
    su, sv = stack.shear[:, 0], stack.shear[:, 1]
    is_tilted = tilted(stack)
    pr = np.arange(R) * stack.ps[0]  # along c
    pc = np.arange(C) * stack.ps[1]  # along r
    q_n, q_c, q_r, A0 = resample_grid(stack, spacing, grid)
    rev = _toward_lap(A0, (len(q_n), len(q_c), len(q_r))) if kernel == "bspline" else [False] * 3
    ext = getattr(stack, "extent", (pr[-1], pc[-1]))
    e_c, e_r = max(ext[0] - pr[-1], 0.0), max(ext[1] - pc[-1], 0.0)  # > 0 only for a reduced decode
    if not is_tilted:
        Wc0 = weights(pr, q_c, spacing[1], e_c, 1)
        Wr0 = weights(pc, q_r, spacing[2], e_r, 2)
        if on_fill is not None:  # in-plane coverage: rows / columns of the grid outside the input
            cover0 = np.outer(np.asarray(Wc0.sum(1)).ravel(), np.asarray(Wr0.sum(1)).ravel()).astype(np.float32)

    def inplane(k):
        x = stack.slice(k)
        if x.shape != (R, C):
            raise SeriesError("pixel data shape does not match Rows/Columns")
        # NaN/inf propagate into the sum (float32 cannot overflow float64); a DICOM stack's
        # loader already guarantees finite values (SliceStack.finite)
        if not getattr(stack, "finite", False) and not np.isfinite(x.sum(dtype=np.float64)):
            raise SeriesError("non-finite pixel values")
        if on_slice is not None:
            on_slice(x)
        if ct:
            np.clip(x, HU_RANGE[0], HU_RANGE[1], out=x)
        if fill:
            x -= fill  # resample (x - fill): rows/columns without support come out as fill
        if is_tilted:  # each slice shifted in-plane by its shear: its own weights
            Wc = weights(pr + su[k], q_c, spacing[1], e_c, 1)
            Wr = weights(pc + sv[k], q_r, spacing[2], e_r, 2)
            cover = np.outer(np.asarray(Wc.sum(1)).ravel(),
                             np.asarray(Wr.T.tocsr().sum(0)).ravel()).astype(np.float32)
        else:
            Wc, Wr, cover = Wc0, Wr0, None
        y = csr_dot(Wc, x)  # (H, C): along c
        return np.ascontiguousarray(csr_dot(Wr, y.T).T), cover  # (H, W): then along r

    Wn = weights(stack.d, q_n, spacing[0])
    tmp = np.empty((len(q_c), len(q_r)), np.float32)
    held = {}
    k_next = 0
    last = np.full(K, -1, np.int64)  # the last output slice that uses each input slice
    np.maximum.at(last, Wn.indices, np.repeat(np.arange(len(q_n)), np.diff(Wn.indptr)))
    for j in range(len(q_n)):
        cols = Wn.indices[Wn.indptr[j]:Wn.indptr[j + 1]]
        ws = Wn.data[Wn.indptr[j]:Wn.indptr[j + 1]]
        if len(cols):
            while k_next <= cols.max():
                held[k_next] = inplane(k_next)
                k_next += 1
            for k in [k for k in held if last[k] < j]:
                del held[k]
        out = np.zeros((len(q_c), len(q_r)), np.float32)
        cov = np.zeros_like(out) if is_tilted else None
        for k, w in zip(cols, ws):
            out += np.multiply(held[k][0], np.float32(w), out=tmp)  # = w * slice, into scratch
            if is_tilted:
                cov += np.multiply(held[k][1], np.float32(w), out=tmp)
        if fill:
            out += fill
        if is_tilted:  # voxels whose kernel reaches a sheared-away (uncovered) pixel become fill
            uncovered = np.abs(cov - 1) > 1e-3  # both signs: a B-spline's negative lobe there sums above 1
            out[uncovered] = fill
        if on_fill is not None:
            filled = uncovered if is_tilted else cover0 * np.float32(ws.sum()) < 0.999
            if filled.any():
                on_fill(j, filled)
        yield j, out


def resample_stack(stack, spacing=SPACING, fill=None):
    """Resample a SliceStack to `spacing`: -> (vol float32 (D, H, W) in stack axes (n, c, r),
    4x4 affine voxel -> RAS). The whole volume in memory: for tests and tools;
    process_stack streams instead."""
    q_n, q_c, q_r, A = resample_grid(stack, spacing)
    vol = np.empty((len(q_n), len(q_c), len(q_r)), np.float32)
    for j, sl in iter_resampled(stack, spacing, fill):
        vol[j] = sl
    return vol, A


def axis_codes(affine):
    """Closest RAS axis code per voxel axis, e.g. 'IPR' (nibabel.aff2axcodes joined)."""
    import nibabel as nib
    return "".join(nib.aff2axcodes(affine))


def to_canonical(vol, affine):
    """Permute/flip a (D, H, W) volume whose axis 0 is the acquisition axis into the canonical
    orientation (module docstring). Returns (vol view, affine, codes)."""
    import nibabel as nib
    io = nib.orientations.io_orientation(affine)  # per voxel axis: world axis, sign
    w_acq = int(io[0, 0])
    order = [w_acq] + [w for w in (2, 1, 0) if w != w_acq]
    perm = [int(np.nonzero(io[:, 0] == w)[0][0]) for w in order]
    out = vol.transpose(perm)
    T = np.zeros((4, 4))
    T[3, 3] = 1
    codes = ""
    for t, (w, a) in enumerate(zip(order, perm)):
        flip = int(io[a, 1]) != _RPI_SIGN[w]
        n = out.shape[t]
        T[a, t] = -1.0 if flip else 1.0
        T[a, 3] = (n - 1) if flip else 0.0
        if flip:
            out = np.flip(out, axis=t)
        codes += _CODES[w][0 if _RPI_SIGN[w] > 0 else 1]
    return out, affine @ T, codes


def window(hu, width, level, levels):
    """Hounsfield units -> integer levels 0..levels-1 (uint8), round half up."""
    hu = np.asarray(hu)
    return window_into(hu, width, level, levels, np.empty(hu.shape, np.uint8),
                       np.empty(hu.shape, np.result_type(hu, np.float32)))


def window_into(hu, width, level, levels, out, tmp):
    """`window` written into uint8 `out`, with float scratch `tmp` (hu's shape): clip((hu - lo)
    * (levels - 1) / width, 0, levels - 1) + 0.5, then the float -> uint8 cast, which
    truncates, i.e. floors here (x + 0.5 is in [0.5, levels - 0.5]): round half up."""
    lo = level - width / 2.0
    np.subtract(hu, np.float32(lo), out=tmp)
    np.multiply(tmp, np.float32((levels - 1) / width), out=tmp)
    np.clip(tmp, 0, levels - 1, out=tmp)
    np.add(tmp, np.float32(0.5), out=tmp)
    np.copyto(out, tmp, casting="unsafe")
    return out


def ct_channels(hu):
    """(D, H, W) HU -> (2, D, H, W) uint8: [brain W80/L40, blood<<4 | bone]."""
    hu = np.asarray(hu)
    return ct_channels_into(hu, np.empty((2,) + hu.shape, np.uint8), np.empty(hu.shape, np.uint8),
                            np.empty(hu.shape, np.result_type(hu, np.float32)))


def ct_channels_into(hu, out, u8, tmp):
    """`ct_channels` written into out (2, *hu.shape) uint8, with uint8 / float scratch of hu's shape."""
    window_into(hu, *CT_WINDOWS["brain"], out[0], tmp)
    window_into(hu, *CT_WINDOWS["blood"], out[1], tmp)
    np.left_shift(out[1], 4, out=out[1])
    np.bitwise_or(out[1], window_into(hu, *CT_WINDOWS["bone"], u8, tmp), out=out[1])
    return out


def otsu_threshold(u8):
    """Otsu threshold of a uint8 array: foreground is u8 > t."""
    return otsu_from_hist(np.bincount(u8.ravel(), minlength=256))


def otsu_from_hist(hist):
    """Otsu threshold from a 256-bin histogram: foreground is value > t."""
    hist = np.asarray(hist, np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        sb = (mu_t * omega - mu) ** 2 / (omega * (1 - omega))
    sb = np.nan_to_num(sb, nan=-1.0)
    return int(np.argmax(sb[:255]))


def fill_holes_2d(m):
    """binary_fill_holes of one 2D bool slice (4-connected background), via one labelling."""
    lab, n = ndi.label(~m)
    if n == 0:
        return m.copy()
    outside = np.zeros(n + 1, bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        outside[edge] = True
    outside[0] = False
    return ~outside[lab]


_SLICE_CROSS = np.zeros((3, 3, 3), bool)
_SLICE_CROSS[1] = ndi.generate_binary_structure(2, 1)  # 4-connected within a slice, never across


def fill_holes_slices_reference(mask, chunk=4):
    """binary_fill_holes slice by slice of a (D, H, W) mask, in place when uint8/bool;
    one labelling per chunk of slices (the structure never connects slices). The
    specification of the C++ kernel `fill_holes_slices` (csrc/volume.cpp)."""
    # any nonzero is foreground (astype(uint8) wrapped 512 to 0 and made 0.5 background)
    out = mask if mask.dtype in (np.uint8, bool) else (mask != 0).astype(np.uint8)
    H, W = mask.shape[1:]
    for d0 in range(0, mask.shape[0], chunk):
        m = out[d0:d0 + chunk] != 0
        out[d0:d0 + chunk] = m  # 0/1 also where nothing is filled below (a uint8 255 stayed 255)
        rows = np.nonzero(m.any(axis=(0, 2)))[0]
        if not len(rows):
            continue  # no foreground: no holes
        cols = np.nonzero(m.any(axis=(0, 1)))[0]
        # label only the foreground's bounding box plus a one-pixel background ring: the
        # ring and everything beyond it are background connected to the image border, so a
        # box component touching the box edge is outside, exactly as in the whole slice
        r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, H)
        c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, W)
        sub = m[:, r0:r1, c0:c1]
        lab, n = ndi.label(~sub, _SLICE_CROSS)
        if n == 0:
            continue
        outside = np.zeros(n + 1, bool)
        for edge in (lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]):
            outside[edge] = True
        outside[0] = False
        out[d0:d0 + chunk, r0:r1, c0:c1] = ~outside[lab]
    return out


def fill_holes_slices(mask, chunk=4):
    """binary_fill_holes slice by slice (4-connected background) of a (D, H, W) mask -> uint8
    or bool 0/1, in place when the mask is a C-contiguous uint8/bool array. The C++ kernel
    (per slice: each row's background beyond its outermost foreground, then a flood fill;
    csrc/volume.cpp) when built, else the reference."""
    if (mask.dtype in (np.uint8, bool) and mask.flags.c_contiguous and mask.ndim == 3
            and ops.backend("fill_holes_slices", "cpu") == "cpp"):
        torch.ops.nvfm.fill_holes_slices(torch.from_numpy(mask))
        return mask
    return fill_holes_slices_reference(mask, chunk)


def foreground(data_u8, hu=None):
    """Voxel foreground (D, H, W) uint8 0/1: CT from HU (> -500), MR by Otsu on uint8."""
    m = (hu > CT_AIR_HU) if hu is not None else (data_u8 > otsu_threshold(data_u8))
    return fill_holes_slices(m.astype(np.uint8))


def token_mask(mask, min_fg_fraction=0.5):
    """(D, H, W) mask -> (gz, gy, gx) bool token foreground, the rule of
    nvfm.tokenize.token_foreground (zero padding at the far ends). Two token rows at a
    time: the 4 slices of each patch are added into a zero-padded uint16 buffer (the size
    of 4 slices), then its 16 x 16 pixel blocks are summed, rows first (contiguous adds);
    no int32 or full-volume copy is made."""
    from nvfm.tokenize import PATCH, min_fg_voxels, token_grid
    need = min_fg_voxels(min_fg_fraction)
    pd, ph, pw = PATCH
    D, H, W = mask.shape
    gz, gy, gx = token_grid(mask.shape)
    binary = mask.dtype == bool or (mask.dtype == np.uint8 and (mask.size == 0 or mask.max() <= 1))
    out = np.zeros((gz, gy, gx), bool)
    blk = 2  # token rows per pass: a uint16 buffer the size of 4 uint8 slices
    zc = np.zeros((min(blk, gz), gy * ph, gx * pw), np.uint16)  # zero padding at the far ends
    for z0 in range(0, gz, blk):
        zc[:] = 0
        nz = min(blk, gz - z0)
        slab = mask[z0 * pd:(z0 + nz) * pd]
        for k in range(pd):  # slice k of every patch in the slab
            part = slab[k::pd]
            zc[:len(part), :H, :W] += part if binary else (part != 0)
        cnt = zc[:nz].reshape(nz, gy, ph, gx * pw).sum(axis=2, dtype=np.uint16)  # rows of each patch
        cnt = cnt.reshape(nz, gy, gx, pw).sum(axis=3, dtype=np.uint16)  # then columns: <= 1024
        out[z0:z0 + nz] = cnt >= need
    return out


def canonical_transform(affine, shape):
    """Where the native resampled axes go: -> (perm, flips, canonical affine, codes, shape).
    perm[0] is always 0: the acquisition axis stays first."""
    vol = np.broadcast_to(np.uint8(0), shape)  # a zero-stride stand-in: no allocation
    out, A, codes = to_canonical(vol, affine)
    import nibabel as nib
    io = nib.orientations.io_orientation(affine)
    w_acq = int(io[0, 0])
    order = [w_acq] + [w for w in (2, 1, 0) if w != w_acq]
    perm = [int(np.nonzero(io[:, 0] == w)[0][0]) for w in order]
    flips = [int(io[a, 1]) != _RPI_SIGN[w] for w, a in zip(order, perm)]
    return perm, flips, A, codes, out.shape


def _f16_key(x):
    """Order-preserving uint16 key of float16 values (for exact histogram percentiles)."""
    u = x.view(np.uint16)
    return np.where(u & 0x8000, 0xFFFF - u, u | 0x8000).astype(np.uint16)


def _key_to_f16(k):
    k = np.uint16(k)
    u = np.uint16(k & 0x7FFF) if k & 0x8000 else np.uint16(0xFFFF - k)
    return float(np.array([u], np.uint16).view(np.float16)[0])


_F16_ALL = np.arange(65536, dtype=np.uint16)  # every float16 bit pattern


def f16_raw_hist_reference(buf, chunk=8):
    """65536-bin histogram of a float16 volume's bit patterns, `chunk` slices at a time
    (bincount copies its input to int64: bounded memory; one 65536-bin pass per chunk).
    The specification of the C++ kernel `u16_histogram` (csrc/volume.cpp)."""
    raw = np.zeros(65536, np.int64)
    for d in range(0, buf.shape[0], chunk):
        raw += np.bincount(buf[d:d + chunk].view(np.uint16).ravel(), minlength=65536)
    return raw


def f16_raw_hist(buf, chunk=8):
    """65536-bin int64 histogram of the bit patterns of a float16 (or 16-bit integer) array:
    the C++ kernel `u16_histogram` (counts in place, no int64 copy) when built, else the
    reference."""
    if buf.dtype.itemsize == 2 and buf.flags.c_contiguous and ops.backend("u16_histogram", "cpu") == "cpp":
        return torch.ops.nvfm.u16_histogram(torch.from_numpy(buf.view(np.int16))).numpy()
    return f16_raw_hist_reference(buf, chunk)


def u16_lookup_reference(x, lut, out):
    """out[...] = lut[x] with the 16-bit patterns of x (float16 or 16-bit integers) as
    indices into a 65536-entry uint8 table. The specification of the C++ kernel `u16_lookup`."""
    np.take(lut, x.view(np.uint16), out=out)
    return out


def u16_lookup(x, lut, out):
    """out[...] = lut[x] (see u16_lookup_reference); the C++ kernel when built (numpy's take
    first widens the indices to int64)."""
    if (x.dtype.itemsize == 2 and x.flags.c_contiguous and out.flags.c_contiguous and out.dtype == np.uint8
            and lut.dtype == np.uint8 and lut.size == 65536 and ops.backend("u16_lookup", "cpu") == "cpp"):
        torch.ops.nvfm.u16_lookup(torch.from_numpy(x.view(np.int16)), torch.from_numpy(lut), torch.from_numpy(out))
        return out
    return u16_lookup_reference(x, lut, out)


def percentiles_f16(buf, qs, raw=None):
    """np.percentile(buf, qs) (linear method) of a float16 volume, exactly, from a 65536-bin
    histogram accumulated slice by slice (no copy of the volume); `raw` = f16_raw_hist(buf)
    when already computed."""
    raw = f16_raw_hist(buf) if raw is None else raw
    hist = np.zeros(65536, np.int64)
    hist[_f16_key(_F16_ALL.view(np.float16))] = raw  # bit pattern -> order-preserving key
    cum = np.cumsum(hist)
    n = int(cum[-1])

    def order_stat(k):  # k-th smallest (0-based)
        return _key_to_f16(int(np.searchsorted(cum, k + 1)))
    out = []
    for q in qs:
        idx = q / 100.0 * (n - 1)
        lo, hi = int(np.floor(idx)), int(np.ceil(idx))
        a, b = order_stat(lo), order_stat(hi)
        out.append(a + (idx - lo) * (b - a))
    return out


def _to_f16(src, dst):
    """float32 -> float16 (round to nearest even, as numpy) of a C-contiguous slice into dst;
    torch's vectorised cast when available (numpy's is ~30x slower), bit-identical."""
    try:
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    except (TypeError, ValueError, RuntimeError):
        dst[...] = src


class _FillMask:
    """iter_resampled's on_fill for a canonical (D, H, W) volume: collects which voxels got the
    fill value into `mask` (bool, allocated on the first call; None while there are none).
    place: native (c, r) slice -> canonical (H, W); dpos: output slice j -> canonical d."""

    def __init__(self, shape, place, dpos):
        self.shape, self.place, self.dpos, self.mask = shape, place, dpos, None

    def __call__(self, j, filled):
        if self.mask is None:
            self.mask = np.zeros(self.shape, bool)
        self.mask[self.dpos(j)] = self.place(filled)


def invert_monochrome1(vol, filled=None):
    """MONOCHROME1 display inversion of an MR volume, in place: x -> max + min - x, the extremes
    taken over the voxels holding data. Voxels of `filled` (bool, vol's shape: outside the input,
    set to the fill value when resampling a tilted stack) become the darkest data value, black as
    the fill is in a MONOCHROME2 volume (inverted with the data, the fill 0 would be the brightest
    value and every other level would be squeezed toward black)."""
    if filled is None or not filled.any():
        np.subtract(np.float32(vol.max()) + np.float32(vol.min()), vol, out=vol, casting="same_kind")
        return vol
    data = ~filled
    if not data.any():
        return vol
    hi = np.float32(vol.max(where=data, initial=-np.inf))
    lo = np.float32(vol.min(where=data, initial=np.inf))
    np.subtract(hi + lo, vol, out=vol, casting="same_kind")
    vol[filled] = lo  # = hi + lo - hi: the darkest data value after the inversion
    return vol


def f16_resolves(lo, hi):
    """Does float16 hold the MR clip range [lo, hi] to half a uint8 level? True when the float16
    spacing at max(|lo|, |hi|) is <= (hi - lo) / 255, so rounding to float16 moves no voxel by
    more than half a level. False for a narrow range far from 0 (values 30000..30100: spacing 16,
    level 0.4) and for values below float16's normal range (1e-9: flushed to a few levels or 0)."""
    return bool(hi > lo) and float(np.spacing(np.float16(max(abs(lo), abs(hi))))) <= (hi - lo) / 255.0


class _InputRange:
    """iter_resampled's on_slice: the min `lo` and max `hi` of the input slices as read (a constant
    input is no image, whatever range the fill of a tilted stack's sheared-away wedges adds)."""

    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def __call__(self, x):
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))


def _mr_buffer(stack, spacing, shape, place, dpos, wide=False, on_slice=None):
    """Resampled MR in canonical (D, H, W) order, MONOCHROME1 inverted: float16 (float32 when
    `wide` or when a value reaches float16's limit). place / dpos as process_stack's."""
    buf = np.empty(shape, np.float32 if wide else np.float16)
    h16 = None  # one slice, float16, stack axes
    filled = _FillMask(shape, place, dpos)
    for j, sl in iter_resampled(stack, spacing, on_slice=on_slice,
                                on_fill=filled if stack.photometric == "MONOCHROME1" else None):
        if buf.dtype == np.float16 and max(sl.max(), -sl.min()) >= 65000:  # beyond float16: widen once
            buf = buf.astype(np.float32)
        if buf.dtype == np.float16:
            if h16 is None:
                h16 = np.empty(sl.shape, np.float16)
            _to_f16(sl, h16)
            buf[dpos(j)] = place(h16)
        else:
            buf[dpos(j)] = place(sl)
    if stack.photometric == "MONOCHROME1":  # display inversion; CT HU need none
        invert_monochrome1(buf, filled.mask)
    return buf


def process_stack(stack, min_fg_fraction=0.5, spacing=SPACING):
    """SliceStack -> dict(data (C, D, H, W) uint8, mask (D, H, W) uint8, token_mask, affine,
    orientation, original_orientation, original_spacing, spacing, channels, tilt_deg).

    Streams: input slices are resampled as they are read and each output slice goes
    straight into the canonical uint8 arrays (CT), or into a float16 buffer (MR; float32 if
    values exceed float16, or read again into float32 when not f16_resolves) for the
    volume-wide percentile clip. Peak memory is about the outputs (CT 3 bytes/voxel, MR 4)
    plus a few slices.
    """
    q_n, q_c, q_r, A0 = resample_grid(stack, spacing)
    perm, flips, A, codes, (D, H, W) = canonical_transform(A0, (len(q_n), len(q_c), len(q_r)))
    swap = perm[1] == 2

    def place(sl):  # native (c, r) slice -> canonical (H, W) view
        if swap:
            sl = sl.T
        if flips[1]:
            sl = sl[::-1]
        if flips[2]:
            sl = sl[:, ::-1]
        return sl

    def dpos(j):
        return D - 1 - j if flips[0] else j

    mask = np.empty((D, H, W), np.uint8)
    seen = _InputRange()
    if stack.modality == "CT":
        data = np.empty((2, D, H, W), np.uint8)
        tmp = np.empty((H, W), np.float32)
        u8 = np.empty((H, W), np.uint8)
        for j, sl in iter_resampled(stack, spacing, on_slice=seen):
            hu, d = np.ascontiguousarray(place(sl)), dpos(j)  # canonical layout: fast elementwise passes
            ct_channels_into(hu, data[:, d], u8, tmp)
            np.greater(hu, CT_AIR_HU, out=mask[d])
        # e.g. zero-filled pixel data: as MR, not an image (at 0 HU every token is foreground)
        if flat_range(*np.clip([seen.lo, seen.hi], *HU_RANGE)):  # the range iter_resampled's clamp leaves
            raise SeriesError("constant image (no intensity range)")
    else:
        buf = _mr_buffer(stack, spacing, (D, H, W), place, dpos, on_slice=seen)
        raw = f16_raw_hist(buf) if buf.dtype == np.float16 else None
        if raw is not None:
            lo, hi = percentiles_f16(buf, MR_PERCENTILES, raw)
            if not f16_resolves(lo, hi):  # float16 rounding would move voxels by over half a level: read again
                del buf, raw
                buf, raw = _mr_buffer(stack, spacing, (D, H, W), place, dpos, wide=True), None
        if raw is None:
            lo, hi = np.percentile(buf, MR_PERCENTILES)
        if flat_range(seen.lo, seen.hi) or flat_range(lo, hi):
            raise SeriesError("constant image (no intensity range)")
        data = np.empty((1, D, H, W), np.uint8)
        with np.errstate(over="ignore"):
            scale = np.float32(255.0 / (hi - lo))
        if not np.isfinite(scale):  # a range below ~1e-36: 255 / range overflows float32
            raise SeriesError(f"intensity range too small to scale ({hi - lo:.3g})")

        def to_u8(x):  # float -> uint8 levels: clip to the percentiles, scale, round half up
            return np.floor(np.clip((x.astype(np.float32) - np.float32(lo)) * scale, 0, 255) + np.float32(0.5))
        if raw is not None:  # float16: the same formula tabulated for all 65536 bit patterns
            with np.errstate(invalid="ignore"):
                lut = to_u8(_F16_ALL.view(np.float16)).astype(np.uint8)
            u16_lookup(buf, lut, data[0])
            hist = np.bincount(lut, weights=raw, minlength=256).astype(np.int64)
        else:
            hist = np.zeros(256, np.int64)
            for d in range(D):
                data[0, d] = to_u8(buf[d])
                hist += np.bincount(data[0, d].ravel(), minlength=256)
        del buf
        t = otsu_from_hist(hist)
        for d in range(D):
            mask[d] = data[0, d] > t
    fill_holes_slices(mask)
    tm = token_mask(mask, min_fg_fraction)
    return dict(data=data, mask=mask, token_mask=tm, affine=A, orientation=codes,
                original_orientation=axis_codes(stack.native_affine()),
                original_spacing=[round(x, 4) for x in stack.spacing], spacing=list(spacing),
                channels=int(data.shape[0]), tilt_deg=round(stack.tilt_deg, 2))


# ---------------------------------------------------------------------------------------
# preset "neurovfm": the authors' foreground and intensity rules (MLNeurosurg/neurovfm,
# neurovfm/data/preprocess.py prepare_for_inference), for users of their released encoder.
# Statistics are taken over the centred crop to whole patches (their crop precedes them);
# the shard keeps the whole volume and encode.py --preset=neurovfm applies the same crop.
# Resampling is theirs too (resampled_neurovfm: cubic B-spline on their grid, bspline_matrix).

NEUROVFM_MR_FG_PERCENTILE = 10.0  # MR foreground: voxels strictly above this percentile
NEUROVFM_MR_CLIP = (0.5, 99.5)  # MR intensity: clip to these percentiles, then min-max to [0, 1]
NEUROVFM_EPS = 1e-8  # their min-max denominator: (max - min + 1e-8)


def neurovfm_crop(shape, patch=(4, 16, 16)):
    """Slices of the centred crop of `shape` to whole patches (per axis start (n % p) // 2,
    length (n // p) * p; the rule of nvfm.model.centre_crop_to_patches)."""
    return tuple(slice((n % p) // 2, (n % p) // 2 + (n // p) * p) for n, p in zip(shape, patch))


def neurovfm_mr_stats(vol):
    """-> (foreground threshold, clip lo, clip hi): np.percentile (linear) at 10, 0.5, 99.5 of
    the float64 values of the centre crop of `vol` (D, H, W)."""
    crop = np.asarray(vol[neurovfm_crop(vol.shape)], np.float64)
    if crop.size == 0:
        raise SeriesError("volume smaller than one patch (4 x 16 x 16): nothing left after the centre crop")
    t, lo, hi = np.percentile(crop, (NEUROVFM_MR_FG_PERCENTILE,) + NEUROVFM_MR_CLIP)
    return float(t), float(lo), float(hi)


def neurovfm_mr_scale(x, lo, hi):
    """Their MR intensity in [0, 1]: (clip(x, lo, hi) - lo) / (hi - lo + 1e-8), in float64
    (after the clip, their min and max are lo and hi exactly)."""
    return (np.clip(np.asarray(x, np.float64), lo, hi) - lo) / (hi - lo + NEUROVFM_EPS)


def neurovfm_mr(vol, stats=None):
    """Resampled MR (D, H, W) float -> (data (1, D, H, W) uint8, mask (D, H, W) uint8 0/1):
    mask = vol > 10th percentile (no hole filling), data = round half up of 255 x their [0, 1]
    intensity (uint8: |error| <= 1/510 before encode.py's / 255; the exact values are the
    shard's values block, nvfm/data.py). stats: neurovfm_mr_stats(vol) when computed."""
    t, lo, hi = neurovfm_mr_stats(vol) if stats is None else stats
    if flat_range(lo, hi):
        raise SeriesError("constant image (no intensity range)")
    D = vol.shape[0]
    data = np.empty((1,) + vol.shape, np.uint8)
    mask = np.empty(vol.shape, np.uint8)
    for d in range(D):  # slice by slice: float64 scratch of one slice
        sl = np.asarray(vol[d], np.float64)
        np.greater(sl, t, out=mask[d], casting="unsafe")
        data[0, d] = np.floor(neurovfm_mr_scale(sl, lo, hi) * 255.0 + 0.5)
    return data, mask


def neurovfm_ct_mask(hu):
    """Their CT foreground: HU > -500, voxel by voxel (no hole filling) -> uint8 0/1."""
    return (np.asarray(hu) > CT_AIR_HU).astype(np.uint8)


def resampled_canonical(stack, spacing=SPACING, rpi_order=False, **how):
    """SliceStack -> (float32 (D, H, W) canonical volume, canonical affine, orientation codes):
    the same resampling and orientation as process_stack, kept in float (CT in clamped HU,
    MR with MONOCHROME1 inverted), for rules that need the whole volume's values. `how`:
    iter_resampled's fill / kernel / grid / clamp (resampled_neurovfm: the authors' choices); a
    tilted CT's voxels outside the input are -1024 HU (air) whatever the fill. rpi_order=True:
    H and W in R, P, I order after the acquisition axis, as the authors' array (their RPI image
    transposed so the 4 mm axis is first): a sagittal series is "RPI", not "RIP" (axial "IPR"
    and coronal "PIR" are the same either way)."""
    q_n, q_c, q_r, A0 = resample_grid(stack, spacing, how.get("grid", "centre"))
    perm, flips, A, codes, (D, H, W) = canonical_transform(A0, (len(q_n), len(q_c), len(q_r)))
    swap = bool(rpi_order) and codes[0] in "RL"
    if swap:
        A, codes, H, W = A[:, [0, 2, 1, 3]], codes[0] + codes[2] + codes[1], W, H
    vol = np.empty((D, H, W), np.float32)
    mono1 = stack.modality != "CT" and stack.photometric == "MONOCHROME1"
    air = stack.modality == "CT" and tilted(stack)  # a tilt's sheared-away wedges: -1024 HU, whatever the fill

    def place(sl):
        if perm[1] == 2:
            sl = sl.T
        if flips[1]:
            sl = sl[::-1]
        if flips[2]:
            sl = sl[:, ::-1]
        return sl.T if swap else sl

    def dpos(j):
        return D - 1 - j if flips[0] else j
    filled = _FillMask((D, H, W), place, dpos)
    for j, sl in iter_resampled(stack, spacing, on_fill=filled if mono1 or air else None, **how):
        vol[dpos(j)] = place(sl)
    if mono1:
        invert_monochrome1(vol, filled.mask)
    if air and filled.mask is not None:  # (fill 0, SimpleITK's default pixel value, is soft tissue)
        vol[filled.mask] = HU_RANGE[0]
    return vol, A, codes


def resampled_neurovfm(stack, spacing=SPACING, pixel_type=None):
    """The authors' resampling (SimpleITK ResampleImageFilter, sitkBSpline, after orienting
    to RPI; neurovfm/data/utils.py preprocess_image) of a SliceStack -> as resampled_canonical:
    cubic B-spline interpolation (bspline_matrix, separable per axis), their grid
    (resample_grid "origin"), 0 outside the input (their default pixel value, for CT too; but a
    tilted CT's sheared-away wedges, which theirs does not have, are air: resampled_canonical),
    no HU clamp before interpolating, and integer-valued inputs (DICOM integer pixels with an
    integer rescale: SimpleITK keeps an integer pixel type) truncated toward 0 after it (ITK's
    static_cast), and their array order (rpi_order: a sagittal series is "RPI", their
    transpose (2, 1, 0) of the RPI array). Checked against SimpleITK itself in
    tests/test_sitk_parity.py. What stays ours: a gantry tilt is resampled away (their reader
    ignores it), a non-uniform slice axis is interpolated at the slices' own positions (theirs
    assumes one spacing), and an oblique series keeps its own grid; they choose the 4 mm axis
    by a spacing/size heuristic, we take the acquisition axis (the same for ordinary series).

    pixel_type (default: the stack's `itk_pixel_type` attribute, when its reader sets one):
    the pixel type SimpleITK reads the input as (itk_nifti_pixel_type, itk_dicom_pixel_type),
    which ITK keeps for the output: an integer type truncates toward 0 and clamps to its range
    (an unsigned MR volume's B-spline undershoot at the edge of the head is 0, not negative;
    that moves the 0.5th percentile of the MR clip), a float type does neither. None: integer-valued inputs
    are truncated, not clamped (right for signed types, e.g. int16 CT). A constant input is a
    SeriesError ("constant image"), as in process_stack."""
    pixel_type = pixel_type or getattr(stack, "itk_pixel_type", None)
    integral, rng = [True], _InputRange()

    def seen(x):
        rng(x)
        if integral[0] and not np.array_equal(x, np.trunc(x)):
            integral[0] = False
    vol, A, codes = resampled_canonical(stack, spacing, rpi_order=True, fill=0.0, kernel="bspline", grid="origin",
                                        clamp=False, on_slice=seen)
    if flat_range(rng.lo, rng.hi):  # as process_stack: the fill outside the input is no intensity range
        raise SeriesError("constant image (no intensity range)")
    if pixel_type is None:  # unknown: integer-valued inputs as int16-like (truncated, not clamped)
        if integral[0]:
            np.trunc(vol, out=vol)
    elif np.dtype(pixel_type).kind in "iu":
        np.trunc(vol, out=vol)
        info = np.iinfo(np.dtype(pixel_type))
        np.clip(vol, info.min, info.max, out=vol)
    return vol, A, codes


def itk_nifti_pixel_type(header):
    """The pixel type (numpy dtype name) SimpleITK's NIfTI reader gives a file, for
    resampled_neurovfm's pixel_type: the stored type, unless scl_slope / scl_inter rescale it
    (slope finite and not 0, and slope != 1 or intercept != 0): then float32 (float64 stays)."""
    dt = np.dtype(header.get_data_dtype())
    slope, inter = (float(header[k]) for k in ("scl_slope", "scl_inter"))
    slope = slope if np.isfinite(slope) else 0.0
    inter = inter if np.isfinite(inter) else 0.0
    rescaled = abs(slope) > 1e-12 and (abs(slope - 1.0) > 1e-12 or abs(inter) > 1e-12)
    if rescaled and dt != np.float64:
        return "float32"
    return dt.name


def itk_dicom_pixel_type(bits_stored, pixel_representation, slope=1.0, intercept=0.0):
    """The pixel type (numpy dtype name) SimpleITK (GDCM) reads a DICOM series as, for
    resampled_neurovfm's pixel_type: a non-integer rescale slope or intercept -> float64; else
    the smallest integer type (uint8/16/32 when nothing is negative, else int8/16/32) holding
    the rescaled range of BitsStored (e.g. unsigned 12-bit MR -> uint16, signed 16-bit CT with
    intercept -1024 -> int32, unsigned 12-bit CT with intercept -1024 -> int16)."""
    slope, intercept = float(slope), float(intercept)
    if slope != int(slope) or intercept != int(intercept):
        return "float64"
    b = int(bits_stored)
    lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if int(pixel_representation) else (0, 2 ** b - 1)
    a, c = sorted((lo * slope + intercept, hi * slope + intercept))
    for t in ((np.uint8, np.uint16, np.uint32) if a >= 0 else (np.int8, np.int16, np.int32)):
        if np.iinfo(t).min <= a and c <= np.iinfo(t).max:
            return np.dtype(t).name
    return "float64"


def values_array(vol):
    """The resampled values kept beside the uint8 windows (nvfm/data.py "values" block):
    int16 when every value is an integer in int16's range (their integer pixel types: CT HU,
    most MR), else float32 (exact either way for a float32 volume)."""
    if np.array_equal(vol, np.trunc(vol)) and vol.size and -32768 <= vol.min() and vol.max() <= 32767:
        return vol.astype(np.int16)
    return np.ascontiguousarray(vol, np.float32)


def process_stack_neurovfm(stack, min_fg_fraction=1.0, spacing=SPACING):
    """process_stack under the authors' rules (preprocess.py --preset=neurovfm); same output
    dict. MR: foreground above the 10th percentile, intensity clipped to the 0.5 / 99.5th
    percentiles then min-max (statistics of the centre crop); CT: foreground HU > -500 with
    no hole filling, windows as process_stack (the shard format's brain 8-bit, blood/bone 4-bit).
    Resampling is theirs: cubic B-spline on their grid (resampled_neurovfm). Also returns
    `values` (values_array of the resampled volume: their intensities before windowing /
    scaling, for full-precision windows, ShardReader.window_float) and for MR `clip` = [lo, hi]."""
    vol, A, codes = resampled_neurovfm(stack, spacing)
    extra = {}
    if stack.modality == "CT":
        if flat_range(float(vol.min()), float(vol.max())):  # as process_stack
            raise SeriesError("constant image (no intensity range)")
        data = ct_channels(vol)
        mask = neurovfm_ct_mask(vol)
    else:
        stats = neurovfm_mr_stats(vol)
        data, mask = neurovfm_mr(vol, stats)
        extra["clip"] = [stats[1], stats[2]]
    values = values_array(vol)
    del vol
    tm = token_mask(mask, min_fg_fraction)
    return dict(data=data, mask=mask, token_mask=tm, affine=A, orientation=codes,
                original_orientation=axis_codes(stack.native_affine()),
                original_spacing=[round(x, 4) for x in stack.spacing], spacing=list(spacing),
                channels=int(data.shape[0]), tilt_deg=round(stack.tilt_deg, 2), values=values, **extra)
