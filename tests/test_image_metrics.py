"""Image metrics agree with scikit-image and numpy reference computations."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from cpvs.image_metrics import image_metrics, mae, mse, pcc, psnr, ssim, to_8bit
from cpvs.plate import read_image


@pytest.fixture(scope="module")
def pair(request):
    from conftest import PEDIATRIC

    truth = read_image(PEDIATRIC / "r03c03f03p01-ch5sk1fk1fl1.tiff").astype(np.float64)[:400, :500]
    rng = np.random.default_rng(0)
    pred = truth * 0.8 + rng.normal(0, 200, truth.shape) + 50
    return truth, pred


def test_metrics_match_reference_implementations_on_a_real_image(pair):
    truth, pred = pair
    t8, p8 = to_8bit(truth).numpy(), to_8bit(pred).numpy()
    assert t8.min() == 0 and t8.max() == 255 and np.all(t8 == np.round(t8))
    assert ssim(t8, p8) == pytest.approx(structural_similarity(t8, p8, data_range=255), abs=1e-9)
    assert psnr(t8, p8) == pytest.approx(peak_signal_noise_ratio(t8, p8, data_range=255), abs=1e-9)
    assert mse(t8, p8) == pytest.approx(mean_squared_error(t8, p8), abs=1e-9)
    assert mae(t8, p8) == pytest.approx(np.abs(t8 - p8).mean(), abs=1e-12)
    assert pcc(truth, pred) == pytest.approx(np.corrcoef(truth.ravel(), pred.ravel())[0, 1], abs=1e-12)


def test_metric_properties(pair):
    truth, pred = pair
    perfect = image_metrics(truth, truth)
    assert perfect["mae"] == 0 and perfect["ssim"] == pytest.approx(1) and perfect["pcc"] == pytest.approx(1)
    assert perfect["psnr"] == float("inf")
    # Metrics on 8-bit images by each image's own range: a global gain and offset do not matter.
    assert image_metrics(truth, 3 * truth + 100) == pytest.approx(perfect)
    worse = image_metrics(truth, pred)
    assert worse["ssim"] < 1 and worse["pcc"] < 1 and worse["mae"] > 0
    assert np.isnan(pcc(np.ones((8, 8)), truth[:8, :8]))
