"""Render one simulated field: cells -> 5 fluorescence channels and 3 brightfield planes.

All channels come from the same cells. Fluorescence channels paint organelles
(nuclei with chromatin texture, nucleoli, perinuclear ER, mitochondria, actin
fibres, membrane and Golgi). Brightfield is computed from an optical-path map
(cell thickness x refractive index: cell body, nucleus, nucleoli, organelles and
vesicles that carry no stain) seen at three defocus distances through the
transport-of-intensity relation I(z) ≈ I0·(1 − z·∇²φ_z), with defocus blur
growing with |z|. Predicting stains from brightfield is therefore learnable
(nuclei and nucleoli are dense) but not trivial (the stains' textures are only
weakly present in the phase, and unstained vesicles are).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from cpvs.simulate.design import PARAMS

FLUO = ("DNA", "ER", "RNA", "AGP", "Mito")
BF_PLANES = (("BF_low", -0.6), ("BF", 0.15), ("BF_high", 1.05))  # name, relative defocus
CELL_RADIUS = 30.0  # px at 20x with 2x2 binning (~0.65 µm/px)
CELLS_PER_MPX = 75.0


@dataclass
class Optics:
    """Per-plate acquisition: channel gains, background, vignetting, focus."""

    gain: dict[str, float]
    offset: float
    vignette_center: tuple[float, float]
    vignette_strength: dict[str, float]
    focus_shift: float
    psf_sigma: float


def plate_optics(rng: np.random.Generator, batch_index: int) -> Optics:
    chans = FLUO + tuple(n for n, _ in BF_PLANES)
    return Optics(
        gain={c: float(np.exp(rng.normal(0.0, 0.18) + 0.12 * batch_index * (1 if i % 2 else -1))) for i, c in enumerate(chans)},
        offset=float(100 + rng.uniform(0, 40)),
        vignette_center=(float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65))),
        vignette_strength={c: float(rng.uniform(0.25, 0.45)) for c in chans},
        focus_shift=float(0.12 * batch_index + rng.normal(0, 0.04)),
        psf_sigma=float(1.1 + 0.15 * batch_index),
    )


def _normalized(noise: np.ndarray) -> np.ndarray:
    noise -= noise.mean()
    noise /= noise.std() + 1e-8
    return noise


def _freqs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return (fft.fftfreq(shape[0]).astype(np.float32)[:, None] ** 2,
            fft.rfftfreq(shape[1]).astype(np.float32)[None, :] ** 2)


def _gauss_tf(f2: tuple[np.ndarray, np.ndarray], sy: float, sx: float | None = None) -> np.ndarray:
    """Fourier transfer function of a Gaussian blur with sigmas (sy, sx) in pixels."""
    sx = sy if sx is None else sx
    return np.exp(-2 * np.pi**2 * (sy * sy * f2[0] + sx * sx * f2[1]))


class _Textures:
    """Gaussian random fields made directly in the Fourier domain: one inverse FFT
    per texture instead of several large spatial convolutions."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], n_noise: int = 2):
        self.shape = shape
        self.fshape = (fft.next_fast_len(shape[0], real=True), fft.next_fast_len(shape[1], real=True))
        self.f2 = _freqs(self.fshape)
        spec = (self.fshape[0], self.fshape[1] // 2 + 1, 2)
        # Textures painted into disjoint compartments (nucleus vs cytoplasm) or at
        # different scales may share a noise spectrum; it saves most of the cost.
        self.noise = [rng.standard_normal(spec, dtype=np.float32).view(np.complex64)[..., 0] for _ in range(n_noise)]

    def make(self, sigma: float, sigma_hi: float | None = None, sigma_x: float | None = None, noise: int = 0) -> np.ndarray:
        """Noise blurred by ``sigma`` (anisotropic with ``sigma_x``), minus the same
        noise blurred by ``sigma_hi`` (a band-pass) when given; mean 0, std 1."""
        tf = _gauss_tf(self.f2, sigma, sigma_x)
        if sigma_hi is not None:
            tf = tf - _gauss_tf(self.f2, sigma_hi)
        t = fft.irfft2(self.noise[noise] * tf, s=self.fshape)[: self.shape[0], : self.shape[1]]
        return _normalized(np.ascontiguousarray(t, dtype=np.float32))


def _defocus_laplacians(phase: np.ndarray, sigmas: list[float]) -> list[np.ndarray]:
    """Laplacian of the phase map blurred by each sigma, via one forward FFT."""
    pad = int(4 * max(sigmas)) + 2
    padded = np.pad(phase, pad, mode="reflect")
    fshape = (fft.next_fast_len(padded.shape[0], real=True), fft.next_fast_len(padded.shape[1], real=True))
    spec = fft.rfft2(padded, s=fshape)
    f2 = _freqs(fshape)
    lap_tf = -4 * np.pi**2 * (f2[0] + f2[1])
    h, w = phase.shape
    return [
        np.ascontiguousarray(fft.irfft2(spec * (lap_tf * _gauss_tf(f2, s)), s=fshape)[pad : pad + h, pad : pad + w], dtype=np.float32)
        for s in sigmas
    ]


def _cell_params(rng: np.random.Generator, n: int, effects: dict[str, float], strength: float) -> dict[str, np.ndarray]:
    """Per-cell multipliers: natural variation x dose-dependent MOA effect with
    per-cell response heterogeneity (some cells do not respond)."""
    responds = rng.random(n) > 0.1
    s = strength * np.clip(rng.normal(1.0, 0.25, n), 0.3, 1.7) * responds
    p: dict[str, np.ndarray] = {}
    for k in PARAMS:
        natural = rng.normal(0.0, 0.12 if k not in ("round", "nuc_frag") else 0.0, n)
        p[k] = natural + effects.get(k, 0.0) * s
    return p


def _place_centers(rng: np.random.Generator, n: int, h: int, w: int, min_dist: float) -> np.ndarray:
    pts: list[tuple[float, float]] = []
    tries = 0
    margin = -0.3 * CELL_RADIUS  # cells may be cut by the field border
    while len(pts) < n and tries < n * 30:
        tries += 1
        y, x = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
        if all((y - a) ** 2 + (x - b) ** 2 > min_dist**2 for a, b in pts):
            pts.append((y, x))
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def render_field(
    rng: np.random.Generator,
    shape: tuple[int, int],
    effects: dict[str, float],
    strength: float,
    optics: Optics,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One field.

    Returns ({channel: (H, W) uint16}, nuclei labels (H, W) int32, cell labels (H, W) int32).
    """
    h, w = shape
    count_mult = np.exp(effects.get("count", 0.0) * strength)
    n_cells = max(1, rng.poisson(CELLS_PER_MPX * h * w / 1e6 * count_mult))
    p = _cell_params(rng, n_cells, effects, strength)
    radius = CELL_RADIUS * np.exp(p["size"]) * np.exp(rng.normal(0, 0.12, n_cells))
    centers = _place_centers(rng, n_cells, h, w, min_dist=0.95 * CELL_RADIUS * np.exp(np.median(p["size"])))
    n_cells = len(centers)
    radius = radius[:n_cells]
    p = {k: v[:n_cells] for k, v in p.items()}

    # Cell shapes: star-convex outlines; harmonics shrink as cells round up.
    irregular = 0.22 * np.exp(p["round"])
    harm_amp = rng.normal(0, 1, (n_cells, 4)) * irregular[:, None] / np.arange(1, 5)[None, :] ** 0.7
    harm_amp[:, 0] = np.abs(harm_amp[:, 0]) + 0.35 * irregular  # elongation
    harm_phase = rng.uniform(0, 2 * np.pi, (n_cells, 4))
    nuc_r = 0.42 * radius * np.exp(0.7 * p["nuc_size"] - 0.3 * p["size"])
    nuc_r = np.minimum(nuc_r, 0.8 * radius)
    nuc_ecc = rng.uniform(0.75, 1.0, n_cells)
    nuc_ang = rng.uniform(0, np.pi, n_cells)
    nuc_off = rng.normal(0, 0.12, (n_cells, 2)) * radius[:, None]
    frag = rng.random(n_cells) < 1 / (1 + np.exp(3.5 - p["nuc_frag"]))

    rho = np.full(shape, np.inf, dtype=np.float32)
    label = np.zeros(shape, dtype=np.int32)
    boxes = []
    for i, (cy, cx) in enumerate(centers):
        reach = radius[i] * (1 + np.abs(harm_amp[i]).sum()) + 2
        y0, y1 = int(max(0, cy - reach)), int(min(h, cy + reach + 1))
        x0, x1 = int(max(0, cx - reach)), int(min(w, cx + reach + 1))
        boxes.append((y0, y1, x0, x1))
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        th = np.arctan2(dy, dx)
        r_th = np.ones_like(th)
        for k in range(4):
            r_th += harm_amp[i, k] * np.cos((k + 2) * th - harm_phase[i, k])
        r_th *= radius[i]
        rr = np.sqrt(dy * dy + dx * dx) / np.maximum(r_th, 3.0)
        sub_rho, sub_lab = rho[y0:y1, x0:x1], label[y0:y1, x0:x1]
        win = (rr < 1.0) & (rr < sub_rho)
        sub_rho[win] = rr[win]
        sub_lab[win] = i + 1

    # Nuclei (possibly fragmented), restricted to their own cell.
    nrho = np.full(shape, np.inf, dtype=np.float32)
    for i, (cy, cx) in enumerate(centers):
        y0, y1, x0, x1 = boxes[i]
        if y0 >= y1 or x0 >= x1:
            continue
        ny, nx = cy + nuc_off[i, 0], cx + nuc_off[i, 1]
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - ny
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - nx
        if frag[i]:
            k = int(rng.integers(3, 7))
            ang = rng.uniform(0, 2 * np.pi, k)
            dist = rng.uniform(0.55, 1.1, k) * nuc_r[i]
            fr = nuc_r[i] * rng.uniform(0.25, 0.4, k)
            rn = np.full(dy.shape[0:1] + dx.shape[1:2], np.inf, dtype=np.float32)
            for a, d, r in zip(ang, dist, fr):
                rn = np.minimum(rn, np.sqrt((dy - d * np.sin(a)) ** 2 + (dx - d * np.cos(a)) ** 2) / r)
        else:
            c, s = np.cos(nuc_ang[i]), np.sin(nuc_ang[i])
            u, v = dx * c + dy * s, -dx * s + dy * c
            rn = np.sqrt((u / nuc_r[i]) ** 2 + (v / (nuc_r[i] * nuc_ecc[i])) ** 2)
        own = label[y0:y1, x0:x1] == i + 1
        sub = nrho[y0:y1, x0:x1]
        upd = own & (rn < sub)
        sub[upd] = rn[upd]

    inside = label > 0
    nuc = nrho < 1.0
    cyto = inside & ~nuc
    cell_rho = np.where(inside, rho, 1.0)
    dome_c = np.sqrt(np.clip(1 - cell_rho**2, 0, 1))
    dome_n = np.where(nuc, np.sqrt(np.clip(1 - nrho**2, 0, 1)), 0).astype(np.float32)
    envelope = (~nuc & (nrho < 1.35)).astype(np.float32) * inside

    def per_pixel(values: np.ndarray) -> np.ndarray:
        """A per-cell value (n_cells,) spread over the cell's pixels (0 outside cells)."""
        return np.concatenate([[0.0], values]).astype(np.float32)[label]

    # Textures shared by all cells of the field.
    tex = _Textures(rng, shape)
    tex_chrom = tex.make(1.2, noise=0)  # nucleus only
    tex_er_fine = tex.make(1.0, 2.5, noise=0)
    tex_er_coarse = tex.make(2.5, 6.0, noise=0)
    tex_mito = tex.make(0.9, 2.0, noise=1)  # independent of ER's texture
    tex_cyto = tex.make(4.0, noise=1)
    fibres = (tex.make(0.7, sigma_x=7.0, noise=1), tex.make(7.0, sigma_x=0.7, noise=0))
    fibre_dir = per_pixel(rng.integers(0, 2, n_cells).astype(np.float64)) > 0.5
    fibre_tex = np.where(fibre_dir, fibres[1], fibres[0])

    # Point-like organelles: nucleoli (RNA) and Golgi (AGP), splatted then blurred.
    nucleoli = np.zeros(shape, dtype=np.float32)
    golgi = np.zeros(shape, dtype=np.float32)
    for i, (cy, cx) in enumerate(centers):
        k = rng.poisson(3.0 * np.exp(p["nucleoli"][i])) if not frag[i] else 0
        for _ in range(k):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55) * nuc_r[i]
            y, x = int(cy + nuc_off[i, 0] + d * np.sin(a)), int(cx + nuc_off[i, 1] + d * np.cos(a))
            if 0 <= y < h and 0 <= x < w:
                nucleoli[y, x] += rng.uniform(0.6, 1.0) * 30
        a = rng.uniform(0, 2 * np.pi)
        d = nuc_r[i] * 1.25
        y, x = int(cy + nuc_off[i, 0] + d * np.sin(a)), int(cx + nuc_off[i, 1] + d * np.cos(a))
        if 0 <= y < h and 0 <= x < w and label[y, x] == i + 1:
            golgi[y, x] += 60 * np.exp(p["golgi"][i])
    nucleoli = ndimage.gaussian_filter(nucleoli, 1.6) * nuc
    golgi = ndimage.gaussian_filter(golgi, 3.0) * inside

    keys = [k for k in p if k not in ("nuc_frag", "count", "round", "size", "nuc_size")]
    table = np.concatenate([np.ones((1, len(keys))), np.exp(np.stack([p[k] for k in keys], 1))]).astype(np.float32)
    gathered = table[label]  # one gather for all per-cell multipliers
    ex = {k: np.where(inside, gathered[..., j], 0) for j, k in enumerate(keys)}
    chrom_amp = 0.25 * ex["chromatin"]
    dna = nuc * ex["dna"] * (0.65 + 0.35 * dome_n) * np.clip(1 + chrom_amp * tex_chrom, 0.2, None)
    rna = ex["rna"] * (cyto * 0.3 * np.exp(-1.2 * cell_rho) * np.clip(1 + 0.3 * tex_cyto, 0, None) + 0.22 * nuc) + ex["nucleoli"] * nucleoli * ex["rna"] * 2.5
    coarse = np.clip(ex["er_coarse"] - 1, 0, 3) / 3
    er_tex = (1 - coarse) * tex_er_fine + coarse * tex_er_coarse
    er = ex["er"] * (cyto * np.exp(-1.6 * cell_rho) * np.clip(0.55 + 0.6 * er_tex, 0, None) + 0.3 * envelope)
    punct = np.clip(np.log(np.maximum(ex["mito_punct"], 1e-6)) / 2.5, 0, 1)
    mito_fil = np.clip(tex_mito, 0, None)
    mito_dot = np.clip(tex_mito - 1.2, 0, None) * 2.5
    mito = ex["mito"] * cyto * np.exp(-1.1 * cell_rho) * ((1 - punct) * mito_fil + punct * mito_dot) * 1.3
    membrane = np.exp(-(((1 - cell_rho) / 0.09) ** 2)) * inside
    agp = ex["agp_membrane"] * 0.55 * membrane + ex["agp_fiber"] * 0.45 * np.clip(fibre_tex, 0, None) * dome_c * inside \
        + 0.15 * inside + golgi

    # Optical path: cell body + nucleus + nucleoli + a little of each organelle,
    # plus unstained vesicles that brightfield sees and no stain shows.
    vesicles = np.zeros(shape, dtype=np.float32)
    n_ves = rng.poisson(25 * n_cells)
    ys, xs = rng.integers(0, h, n_ves), rng.integers(0, w, n_ves)
    keep = cyto[ys, xs]
    np.add.at(vesicles, (ys[keep], xs[keep]), rng.uniform(2, 6, int(keep.sum())).astype(np.float32))
    vesicles = ndimage.gaussian_filter(vesicles, 1.0)
    thickness = per_pixel(np.exp(-0.5 * p["round"]) * rng.uniform(0.8, 1.2, n_cells))
    phase = (
        0.8 * thickness * dome_c * inside + 1.0 * dome_n + 0.04 * nucleoli + 0.18 * mito + 0.10 * er + 0.05 * agp + 0.35 * vesicles
    ).astype(np.float32)

    out: dict[str, np.ndarray] = {}
    yy = (np.arange(h, dtype=np.float32)[:, None] / h - optics.vignette_center[0]) ** 2
    xx = (np.arange(w, dtype=np.float32)[None, :] / w - optics.vignette_center[1]) ** 2
    r2 = (yy + xx) / 0.5
    scale = {"DNA": 5000.0, "ER": 1800.0, "RNA": 1500.0, "AGP": 2200.0, "Mito": 2500.0}
    for name, img in zip(FLUO, (dna, er, rna, agp, mito)):
        img = ndimage.gaussian_filter(img.astype(np.float32), optics.psf_sigma)
        vign = 1 - optics.vignette_strength[name] * r2
        signal = img * (scale[name] * optics.gain[name]) * vign
        out[name] = _camera(rng, signal, optics.offset, gain_e=0.6, read_noise=4.0)
    defocus = [z + optics.focus_shift for _, z in BF_PLANES]
    laps = _defocus_laplacians(phase, [1.0 + 2.2 * abs(zz) for zz in defocus])
    for (name, _), zz, lap in zip(BF_PLANES, defocus, laps):
        vign = 1 - 0.3 * optics.vignette_strength[name] * r2
        contrast = 1 - 0.04 * phase * (abs(zz) < 0.4) - 7.0 * zz * lap
        signal = 20000.0 * optics.gain[name] * vign * np.clip(contrast, 0.2, 2.0)
        out[name] = _camera(rng, signal, optics.offset, gain_e=0.45, read_noise=6.0)
    nuclei_labels = np.where(nuc, label, 0).astype(np.int32)
    return out, nuclei_labels, label


def _camera(rng: np.random.Generator, signal: np.ndarray, offset: float, gain_e: float, read_noise: float) -> np.ndarray:
    """Shot noise (Gaussian approximation of Poisson, variance = gain x signal) plus
    read noise, drawn as one Gaussian of the summed variance; offset; to uint16."""
    signal = np.maximum(signal, 0, dtype=np.float32)
    sd = np.sqrt(gain_e * signal + read_noise**2)
    noisy = signal + offset + sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)
