"""Engine modules texture, granularity and radial distribution against cp_measure (the reference).

On the real pediatric field (cpvs's own masks) and a simulated field, every key must agree:
median relative difference over objects <= 1e-3 for >= 95 % of the keys, Pearson >= 0.99 for
the others. Unit tests pin the pieces that the fields may not exercise (grey-level counts,
unscaled bins, concave / ring / split objects, the GPU reconstruction schedule).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cpvs.plate import read_image
from cpvs.profile.engine import granularity, inner_distance, radial, reconstruction, texture
from cpvs.profile.segment import SegmentParams, segment_field
from conftest import PEDIATRIC

CHANNELS = {"DNA": 5, "Mito": 4}  # a dim and a bright stain: few and all 256 grey levels
COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")


def _field(kind: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if kind == "pediatric":
        images = {k: read_image(PEDIATRIC / f"r03c03f03p01-ch{v}sk1fk1fl1.tiff").astype(np.float64) / 65535
                  for k, v in {**CHANNELS, "AGP": 3}.items()}
        m = segment_field(images)
    else:
        from cpvs.simulate.render import plate_optics, render_field

        raw, _, _ = render_field(np.random.default_rng(5), (600, 600), {}, 0.0, plate_optics(np.random.default_rng(0), 0))
        images = {k: raw[k].astype(np.float64) / 65535 for k in (*CHANNELS, "AGP")}
        m = segment_field(images, SegmentParams(keep_border=True))
    return images, {"Nuclei": m.nuclei, "Cells": m.cells, "Cytoplasm": m.cytoplasm}


@pytest.fixture(scope="module", params=["pediatric", "simulated"])
def field(request):
    images, masks = _field(request.param)
    assert masks["Cells"].max() >= 20
    return request.param, images, masks


def _reference(fn, masks, images, **kw) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {(comp, ch): {k: np.asarray(v, float) for k, v in fn(masks[comp], images[ch], **kw).items()}
                for comp in COMPARTMENTS for ch in CHANNELS}


def _ours(module, masks, images, **kw) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    out = {}
    for comp in COMPARTMENTS:
        lab = torch.from_numpy(masks[comp].astype(np.int64))  # one tensor per compartment, as the engine
        for ch in CHANNELS:
            out[(comp, ch)] = module.measure(lab, torch.from_numpy(images[ch]), int(lab.max()), **kw)
    return out


def _agreement(ours, ref) -> list[tuple[float, float, str]]:
    """(median relative difference, Pearson r, key) per key and (compartment, channel)."""
    rows = []
    for (comp, ch), r in ref.items():
        assert list(ours[(comp, ch)]) == list(r), "same keys in cp_measure's order"
        for k, b in r.items():
            a = ours[(comp, ch)][k]
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"NaN pattern of {comp} {ch} {k}")
            ok = np.isfinite(a) & np.isfinite(b)
            rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-12)
            med = float(np.median(rel)) if ok.any() else 0.0
            if ok.sum() > 2 and np.std(a[ok]) > 0 and np.std(b[ok]) > 0:
                pr = float(np.corrcoef(a[ok], b[ok])[0, 1])
            else:
                pr = 1.0 if np.allclose(a[ok], b[ok], rtol=1e-6, atol=1e-12) else 0.0
            rows.append((med, pr, f"{comp}_{k}_{ch}"))
    return rows


def _assert_agree(rows):
    worst = "\n".join(f"  {k}: median rel diff {m:.2e}, Pearson {r:.5f}" for m, r, k in sorted(rows, reverse=True)[:8])
    close = np.mean([m <= 1e-3 for m, _, _ in rows])
    assert close >= 0.95, f"only {close:.1%} of keys within 1e-3; worst:\n{worst}"
    loose = [(m, r, k) for m, r, k in rows if m > 1e-3 and r < 0.99]
    assert not loose, f"keys neither within 1e-3 nor correlated >= 0.99:\n{worst}"


def test_texture_matches_cp_measure(field):
    from cp_measure.core.measuretexture import get_texture

    _, images, masks = field
    _assert_agree(_agreement(_ours(texture, masks, images), _reference(get_texture, masks, images)))


@pytest.mark.slow
def test_granularity_matches_cp_measure(field):
    from cp_measure.core.measuregranularity import get_granularity

    _, images, masks = field
    _assert_agree(_agreement(_ours(granularity, masks, images), _reference(get_granularity, masks, images)))


@pytest.mark.slow
def test_radial_distribution_and_zernikes_match_cp_measure(field):
    from cp_measure.core.measureobjectintensitydistribution import get_radial_distribution, get_radial_zernikes

    _, images, masks = field
    ref = _reference(get_radial_distribution, masks, images)
    for key, z in _reference(get_radial_zernikes, masks, images).items():
        ref[key].update(z)
    _assert_agree(_agreement(_ours(radial, masks, images), ref))


# ---- pieces the fields may not exercise ---------------------------------------------------------

def _shapes() -> np.ndarray:
    """Touching, concave, ring-shaped, split and border-touching objects, and one single pixel."""
    lab = np.zeros((70, 90), np.int64)
    yy, xx = np.mgrid[:70, :90]
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 15 ** 2] = 1  # disc
    lab[(yy - 20) ** 2 + (xx - 45) ** 2 <= 12 ** 2] = 2  # touches the disc
    ring = ((yy - 50) ** 2 + (xx - 25) ** 2 <= 14 ** 2) & ((yy - 50) ** 2 + (xx - 25) ** 2 > 6 ** 2)
    lab[ring] = 3
    lab[35:69, 50:56] = 4  # an L, touching the bottom border
    lab[60:69, 50:88] = 4
    lab[5:15, 70:80] = 5  # two pieces of one object
    lab[20:24, 82:90] = 5  # (this one touches the right border)
    lab[30, 80] = 6
    return lab


def test_geometry_matches_scipy_and_centrosome_on_awkward_shapes():
    from centrosome.cpmorphology import distance_to_edge
    from cp_measure.core.measureobjectintensitydistribution import get_radial_distribution

    lab = _shapes()
    obj = texture.objects(torch.from_numpy(lab), int(lab.max()))
    d2 = inner_distance.edge_distance2(obj)
    np.testing.assert_allclose(d2.sqrt().numpy(), distance_to_edge(lab)[lab > 0][_row_major_to_object(lab)], atol=1e-12)
    rng = np.random.default_rng(0)
    img = rng.random(lab.shape)
    for scaled in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = get_radial_distribution(lab, img, scaled=scaled, bin_count=3, maximum_radius=9)
        ours = radial.measure(torch.from_numpy(lab), torch.from_numpy(img), 6, zernikes=False, scaled=scaled, bin_count=3,
                              maximum_radius=9)
        assert list(ours) == list(ref)
        for k in ref:
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def _row_major_to_object(lab: np.ndarray) -> np.ndarray:
    """Permutation from row-major foreground order to the engine's object-major order."""
    return np.argsort(lab[lab > 0], kind="stable")


def test_texture_levels_and_small_objects():
    from cp_measure.core.measuretexture import get_texture

    lab = _shapes()
    img = np.random.default_rng(1).random(lab.shape) ** 2
    img[lab == 2] = 0.001  # quantizes to 0 everywhere: no pair, NaN
    for levels in (256, 8):
        ref = get_texture(lab, img, scale=2, gray_levels=levels)
        ours = texture.measure(torch.from_numpy(lab), torch.from_numpy(img), 6, scale=2, gray_levels=levels)
        assert list(ours) == list(ref)
        for k in ref:
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)
    assert np.isnan(ours["Contrast_2_00_8"][[1, 5]]).all()


def test_generic_torch_paths_match_the_cpu_shortcuts(monkeypatch):
    """The code a GPU runs (torch sort / index_add instead of numpy) gives the same numbers."""
    lab = torch.from_numpy(_shapes())
    img = torch.from_numpy(np.random.default_rng(4).random(lab.shape))
    fast = {m: m.measure(lab, img, 6) for m in (texture, radial)}
    monkeypatch.setattr(texture, "NUMPY_ON_CPU", False)
    lab = lab.clone()  # nothing cached
    for m, ref in fast.items():
        out = m.measure(lab, img, 6)
        for k in ref:
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=k)


def _one_pixel_seed(mask: torch.Tensor) -> torch.Tensor:
    """Zero but at the first maximum of ``mask``: its reconstruction floods that pixel's region."""
    seed = torch.zeros_like(mask)
    seed.view(-1)[int(mask.argmax())] = mask.max()
    return seed


def test_reconstruction_schedules_match_skimage():
    """Both schedules (compiled hybrid scans on CPU, whole-field dilations on GPU) give skimage's
    reconstruction exactly, on float values and on int32 ranks, with plateaus (ties) and winding paths."""
    from skimage.morphology import disk, reconstruction as sk_reconstruction

    rng = np.random.default_rng(2)
    noisy = rng.random((40, 50))
    plateaus = np.round(rng.random((37, 29)) * 4) / 4
    spiral = np.zeros((31, 31))  # a one-pixel corridor that turns at every wall: many sequential steps
    spiral[1:-1:2, 1:-1] = 1
    spiral[1:-1, 1] = spiral[1:-1, -2] = 1
    spiral[2:-2:4, -2] = spiral[4:-2:4, 1] = 0
    for image in (noisy, plateaus, spiral, np.ones((3, 3)), np.arange(7.0)[None]):
        mask = torch.from_numpy(image)
        seeds = torch.stack([granularity._erode_cross(mask), granularity._erode_cross(granularity._erode_cross(mask)),
                             _one_pixel_seed(mask)])
        ref = np.stack([sk_reconstruction(s.numpy(), mask.numpy(), footprint=disk(1)) for s in seeds])
        np.testing.assert_array_equal(reconstruction.reconstruct(seeds, mask).numpy(), ref)
        np.testing.assert_array_equal(reconstruction.reconstruct_dilations(seeds, mask).numpy(), ref)
        _, ranks = np.unique(image, return_inverse=True)
        ranks = torch.from_numpy(ranks.reshape(image.shape).astype(np.int32))
        rank_seeds = torch.stack([granularity._erode_cross(ranks), granularity._erode_cross(granularity._erode_cross(ranks))])
        rank_ref = np.stack([sk_reconstruction(s.numpy(), ranks.numpy(), footprint=disk(1)) for s in rank_seeds])
        np.testing.assert_array_equal(reconstruction.reconstruct(rank_seeds, ranks).numpy(), rank_ref)


def test_granularity_on_a_small_image_is_nan_and_absent_objects_are_nan():
    lab = torch.zeros((6, 6), dtype=torch.int64)
    lab[1:3, 1:3] = 1
    out = granularity.measure(lab, torch.rand(6, 6, dtype=torch.float64), 1)
    assert np.isnan(out["Granularity_1"]).all()
    lab = torch.from_numpy(_shapes())
    lab[lab == 3] = 0  # label 3 absent
    img = torch.rand(lab.shape, dtype=torch.float64)
    for module in (texture, granularity, radial):
        out = module.measure(lab, img, 6)
        assert all(np.isnan(v[2]) for v in out.values()), module.__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_matches_cpu():
    lab = torch.from_numpy(_shapes())
    img = torch.from_numpy(np.random.default_rng(3).random(lab.shape))
    for module in (texture, granularity, radial):
        cpu = module.measure(lab, img, 6)
        gpu = module.measure(lab.cuda(), img.cuda(), 6)
        for k in cpu:
            np.testing.assert_allclose(gpu[k], cpu[k], rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=k)
