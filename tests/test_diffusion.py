"""Virtual staining II: the diffusion maths on tiny models, training, and the plate runner."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.errors import CpvsError
from cpvs.models.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP, make_sampler, timesteps
from cpvs.models.diffusion.schedule import NoiseSchedule
from cpvs.models.diffusion.unet import AdaGN, DiffusionUNet, DiffusionUNetConfig

runner = CliRunner()
TINY_NET = DiffusionUNetConfig(3, 5, width=16, channel_mult=(1, 2), num_res_blocks=1, attention_downsample=(2,),
                               head_channels=16, dropout=0.0, num_classes=3)


def test_published_network_size_and_schedule():
    net = DiffusionUNet(DiffusionUNetConfig())
    assert 60e6 < sum(p.numel() for p in net.parameters()) < 66e6
    s = NoiseSchedule.linear()
    assert s.T == 2000 and s.betas[0] == pytest.approx(1e-6) and s.betas[-1] == pytest.approx(0.01)
    assert np.all(np.diff(s.gammas) < 0)


def test_closed_form_forward_process_matches_iterated_noising():
    s = NoiseSchedule.linear(T=200, start=1e-4, end=0.05)
    gen = torch.Generator().manual_seed(0)
    y0 = torch.tensor([1.5, -0.7, 0.2])
    n = 40000
    y = y0.expand(n, 3).clone()
    for t in range(120):  # y_t = √α_t·y_{t−1} + √β_t·z
        y = float(np.sqrt(s.alphas[t])) * y + float(np.sqrt(s.betas[t])) * torch.randn(n, 3, generator=gen)
    t = torch.full((n,), 119)
    closed = s.q_sample(y0.expand(n, 3), t, torch.randn(n, 3, generator=gen))
    g = s.gammas[119]
    for sample in (y, closed):
        np.testing.assert_allclose(sample.mean(0).numpy(), np.sqrt(g) * y0.numpy(), atol=0.02)
        np.testing.assert_allclose(sample.var(0).numpy(), 1 - g, rtol=0.03)


def _eps_fn():
    torch.manual_seed(0)
    w = torch.randn(4, 4) * 0.3
    return lambda y, t: torch.tanh(torch.einsum("ij,bj...->bi...", w, y)) * 0.5


def test_ddim_with_eta_0_is_deterministic():
    s = NoiseSchedule.linear(T=100, start=1e-4, end=0.05)
    eps = _eps_fn()
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    sampler = DDIMSampler(s, 10, eta=0.0)
    a = sampler.sample(eps, noise, lambda i: torch.randn(2, 4, 3, 3))
    b = sampler.sample(eps, noise, lambda i: torch.randn(2, 4, 3, 3) * 100)
    assert torch.equal(a, b)


def test_ddim_with_eta_1_over_all_steps_is_the_ddpm_posterior():
    s = NoiseSchedule.linear(T=50, start=1e-4, end=0.05)
    ddim, ddpm = DDIMSampler(s, 50, eta=1.0), DDPMSampler(s, 50)
    assert ddim.steps == ddpm.steps == list(range(49, -1, -1))
    gen = torch.Generator().manual_seed(0)
    seq = ddim.steps + [-1]
    for t, tp in zip(seq[:-1], seq[1:]):
        y_t, eps = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
        m1, v1, _ = ddim.step_distribution(y_t, eps, t, tp)
        m2, v2, _ = ddpm.step_distribution(y_t, eps, t, tp)
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
        assert v1 == pytest.approx(v2, rel=1e-9, abs=1e-15)
        # and the DDPM posterior itself, written out: β̃_t = β_t (1 − γ_{t−1}) / (1 − γ_t)
        if tp >= 0:
            assert v2 == pytest.approx(s.betas[t] * (1 - s.gammas[tp]) / (1 - s.gammas[t]), rel=1e-9)


def test_classifier_guidance_shifts_the_mean_along_the_gradient_in_proportion_to_s():
    """An analytic classifier, log p(k | y) = <w, y>: its gradient is w everywhere. With a linear
    noise predictor every sampler is affine, so the guided output moves by exactly s times a fixed
    vector, and that vector points along w."""
    s = NoiseSchedule.linear(T=100, start=1e-4, end=0.05)
    a = torch.eye(4) * 0.3
    eps = lambda y, t: torch.einsum("ij,bj...->bi...", a, y)  # noqa: E731
    w = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    grad = lambda y, t: w.expand_as(y)  # noqa: E731
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    for sampler in (DDPMSampler(s, 100), DDIMSampler(s, 20), DPMSolverPP(s, 10)):
        base = sampler.sample(eps, noise, None)
        d1 = sampler.sample(eps, noise, None, grad, 1.0) - base
        d3 = sampler.sample(eps, noise, None, grad, 3.0) - base
        torch.testing.assert_close(d3, 3 * d1, rtol=1e-4, atol=1e-6)
        cos = float((d1 * w).sum() / (d1.norm() * w.norm()))
        assert cos > 0.99, (sampler.name, cos)


def test_labels_change_outputs_only_through_adagn():
    torch.manual_seed(0)
    net = DiffusionUNet(TINY_NET).eval()
    with torch.no_grad():
        net.class_emb.weight.normal_()
        for m in net.modules():  # give the zero-initialized output layers a voice
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, std=0.1)
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 16, 16)
    g = torch.tensor([0.5, 0.5])
    a, b = net(x, y, g, torch.tensor([0, 0])), net(x, y, g, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    null = net(x, y, g, None)
    torch.testing.assert_close(null, net(x, y, g, torch.tensor([-1, -1])))  # absent or unknown: the null class
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append(args[1])) for m in net.modules() if isinstance(m, AdaGN)]
    net(x, y, g, torch.tensor([2, 2]))
    for h in hooks:
        h.remove()
    assert captured and all(c.shape == (2, net.emb_dim) for c in captured)
    with torch.no_grad():  # cut AdaGN's projections: the label no longer matters anywhere
        for m in net.modules():
            if isinstance(m, AdaGN):
                m.proj.weight.zero_()
                m.proj.bias.zero_()
    torch.testing.assert_close(net(x, y, g, torch.tensor([0, 0])), net(x, y, g, torch.tensor([1, 1])))


def test_samplers_recover_a_known_signal_with_the_true_noise_predictor():
    """With an oracle ε (the data is one known image), every sampler returns that image."""
    s = NoiseSchedule.linear()
    target = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(5))

    def oracle(y, t):
        g = s.gamma(t).view(-1, 1, 1, 1)
        return (y - g.sqrt() * target) / (1 - g).sqrt()

    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    for sampler in (DDIMSampler(s, 20), DPMSolverPP(s, 10), DDPMSampler(s, 50)):
        out = sampler.sample(oracle, noise, lambda i: torch.randn(1, 2, 4, 4))
        torch.testing.assert_close(out, target, rtol=1e-3, atol=1e-3)
    assert timesteps(2000, 5) == [1999, 1499, 1000, 500, 0]
    with pytest.raises(CpvsError):
        make_sampler("euler", s)


def test_clamped_samplers_stay_in_the_target_range_and_agree_when_it_is_never_hit():
    s = NoiseSchedule.linear(T=200, start=1e-4, end=0.05)
    eps = _eps_fn()  # a poor ε-model: its clean-image estimates overshoot any data range
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    lo = torch.tensor([-0.5, -1.0, -0.2, -2.0]).view(1, -1, 1, 1)
    hi = torch.tensor([3.0, 1.0, 0.5, 2.0]).view(1, -1, 1, 1)
    wide = (torch.full_like(lo, -1e9), torch.full_like(hi, 1e9))
    for name, steps in (("ddim", 10), ("ddpm", 20), ("dpmpp", 10)):
        free = make_sampler(name, s, steps).sample(eps, noise, lambda i: torch.zeros(2, 4, 8, 8))
        assert (free < lo).any() or (free > hi).any()
        out = make_sampler(name, s, steps, x0_range=(lo, hi)).sample(eps, noise, lambda i: torch.zeros(2, 4, 8, 8))
        assert ((out >= lo - 1e-5) & (out <= hi + 1e-5)).all(), name
        same = make_sampler(name, s, steps, x0_range=wide).sample(eps, noise, lambda i: torch.zeros(2, 4, 8, 8))
        torch.testing.assert_close(same, free, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ddpm_trains_and_predicts_plates_with_uncertainty(sim_root, tmp_path):
    from cpvs.plate import discover_plate, discover_plates, read_image
    from cpvs.predict.runner import PredictConfig, predict_plate
    from cpvs.preprocess.pipeline import preprocess_plates
    from cpvs.train.diffusion import DiffusionConfig, train_diffusion

    plates = [p for d in sorted(sim_root.glob("SIM3-P*")) for p in discover_plates(d)]
    preprocess_plates(plates[:1], tmp_path / "s.zarr", size=(64, 64))
    net = dict(width=16, channel_mult=(1, 2), num_res_blocks=1, attention_downsample=(2,), head_channels=16, dropout=0.0,
               schedule={"kind": "linear", "T": 100, "start": 1e-4, "end": 0.05}, crop=64, batch_size=2, steps_per_epoch=3,
               device="cpu", workers=1)
    res = train_diffusion(DiffusionConfig("ddpm", tmp_path / "s.zarr", tmp_path / "ddpm", label="Metadata_Perturbation",
                                          epochs=2, **net))
    assert list(res.metrics["epoch"]) == [1, 2] and np.isfinite(res.metrics["val_loss"]).all()
    # resume continues exactly
    train_diffusion(DiffusionConfig("ddpm", tmp_path / "s.zarr", tmp_path / "b", label="Metadata_Perturbation", epochs=1, **net))
    train_diffusion(DiffusionConfig("ddpm", tmp_path / "s.zarr", tmp_path / "b", label="Metadata_Perturbation", epochs=2,
                                    resume=True, **net))
    from cpvs.checkpoints import load_checkpoint

    wa, wb = load_checkpoint(tmp_path / "ddpm")["state_dict"], load_checkpoint(tmp_path / "b")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rng = load_checkpoint(tmp_path / "ddpm")["target_range"]
    assert list(rng) == ["DNA", "ER", "RNA", "AGP", "Mito"] and all(lo < 0 < hi <= 15 for lo, hi in rng.values())
    train_diffusion(DiffusionConfig("classifier", tmp_path / "s.zarr", tmp_path / "clf", label="Metadata_Perturbation",
                                    epochs=1, **net))
    plate = sim_root / "SIM3-P01"
    cfg = dict(steps=5, samples=3, seed=7, device="cpu", batch_size=3)
    a = predict_plate(PredictConfig(plate, tmp_path / "pred", tmp_path / "ddpm", **cfg))
    assert a.n_written == 12
    pred = discover_plate(tmp_path / "pred")
    assert pred.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "DNA_std", "ER_std", "RNA_std", "AGP_std", "Mito_std"]
    f = pred.fields[0]
    assert read_image(f.files["DNA"]).shape == (160, 160) and read_image(f.files["Mito_std"]).max() > 0
    # Deterministic for a seed, whatever the batching and sharding.
    for i in (1, 2):
        predict_plate(PredictConfig(plate, tmp_path / "pred2", tmp_path / "ddpm", shard=(i, 2),
                                                       **dict(cfg, batch_size=2)))
    for p in (tmp_path / "pred").glob("*.tiff"):
        assert p.read_bytes() == (tmp_path / "pred2" / p.name).read_bytes()
    # --estimate mean: the first step's clean estimates averaged; the same samples, hence the same std maps.
    # With one step a sample is its first estimate, so both estimates agree exactly.
    one = dict(cfg, shard=(1, 6), dtype="float32")
    for est in ("samples", "mean"):
        for steps in (1, 5):
            predict_plate(PredictConfig(plate, tmp_path / f"{est}{steps}", tmp_path / "ddpm", estimate=est, **dict(one, steps=steps)))
    runs = {d: discover_plate(tmp_path / d).fields for d in ("samples1", "mean1", "samples5", "mean5")}
    for i, f in enumerate(runs["mean5"]):
        for c, path in f.files.items():
            same = np.array_equal(read_image(path), read_image(runs["samples5"][i].files[c]))
            assert same == c.endswith("_std"), c
            assert np.array_equal(read_image(runs["mean1"][i].files[c]), read_image(runs["samples1"][i].files[c])), c
    with pytest.raises(CpvsError, match="estimate"):  # a rerun into the same folder with the other estimate
        predict_plate(PredictConfig(plate, tmp_path / "mean5", tmp_path / "ddpm", estimate="samples", **dict(one, steps=5)))
    # guidance, other samplers and the tile strategy run
    g = predict_plate(PredictConfig(plate, tmp_path / "guided", tmp_path / "ddpm", sampler="ddpm", steps=4,
                                                       guidance=1.0, classifier=tmp_path / "clf", device="cpu", shard=(1, 6)))
    assert g.n_written == 2
    t = predict_plate(PredictConfig(plate, tmp_path / "tiles", tmp_path / "ddpm", sampler="dpmpp", steps=4,
                                                       field_strategy="tiles", tile=32, stride=16, device="cpu", shard=(1, 6)))
    assert t.n_written == 2
    # The checkpoint says what it is: no --model needed; options of the other strategy are refused.
    r = runner.invoke(app, ["--device", "cpu", "predict-plate", str(plate), "--checkpoint", str(tmp_path / "ddpm"), "-o",
                            str(tmp_path / "cli"), "--steps", "2", "--shard", "1/6"])
    assert r.exit_code == 0 and "ddpm model" in r.output, r.output
    r = runner.invoke(app, ["predict-plate", str(plate), "--checkpoint", str(tmp_path / "ddpm"), "-o", str(tmp_path / "x"),
                            "--stitch", "mean"])
    assert r.exit_code == 2 and "--stitch" in r.output and "--field-strategy tiles" in r.output
    # Tiles honour --stitch and --guidance (both were silently ignored before).
    tiled = dict(sampler="ddim", steps=3, field_strategy="tiles", tile=32, stride=16, device="cpu", shard=(1, 6))
    predict_plate(PredictConfig(plate, tmp_path / "t_med", tmp_path / "ddpm", **tiled))
    predict_plate(PredictConfig(plate, tmp_path / "t_mean", tmp_path / "ddpm", stitch="mean", **tiled))
    predict_plate(PredictConfig(plate, tmp_path / "t_guided", tmp_path / "ddpm", guidance=5.0, classifier=tmp_path / "clf", **tiled))
    name = sorted(p.name for p in (tmp_path / "t_med").glob("*.tiff"))[0]
    med, mean, guided = (read_image(tmp_path / d / name) for d in ("t_med", "t_mean", "t_guided"))
    assert not np.array_equal(med, mean) and not np.array_equal(med, guided)
    # --on-error skip leaves a corrupt field out and names it (it raised before).
    broken = tmp_path / "broken"
    shutil.copytree(plate, broken)
    bad = sorted(broken.glob("r01c01f01*ch8sk1*.tiff"))[0]
    bad.write_bytes(b"corrupt")
    with pytest.raises(CpvsError, match="corrupt"):
        predict_plate(PredictConfig(broken, tmp_path / "b1", tmp_path / "ddpm", steps=2, device="cpu", shard=(1, 6)))
    s = predict_plate(PredictConfig(broken, tmp_path / "b2", tmp_path / "ddpm", steps=2, device="cpu", shard=(1, 6), on_error="skip"))
    assert len(s.skipped) == 1 and s.n_written == 1 and "r01c01" not in "".join(p.name for p in (tmp_path / "b2").glob("*.tiff"))
    r = runner.invoke(app, ["evaluate", "--images", "--pred", str(tmp_path / "pred"), "--truth", str(plate), "--json"])
    assert r.exit_code == 0, r.output
    with pytest.raises(CpvsError, match="--classifier"):
        predict_plate(PredictConfig(plate, tmp_path / "x", tmp_path / "ddpm", guidance=1.0, device="cpu"))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_each_parameterization_converts_its_own_target_back_to_the_clean_image_and_the_noise(prediction):
    from cpvs.models.diffusion.prediction import to_x0_eps, training_target

    gen = torch.Generator().manual_seed(0)
    y0, noise = torch.randn(3, 2, 5, 5, generator=gen), torch.randn(3, 2, 5, 5, generator=gen)
    gamma = torch.tensor([0.999, 0.3, 4.5e-5])
    y_t = gamma.sqrt().view(-1, 1, 1, 1) * y0 + (1 - gamma).sqrt().view(-1, 1, 1, 1) * noise
    x0, eps = to_x0_eps(prediction, training_target(prediction, y0, noise, gamma), y_t, gamma)
    torch.testing.assert_close(x0, y0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(eps, noise, rtol=1e-3, atol=2e-3)
    with pytest.raises(CpvsError, match="--prediction"):
        make_sampler("ddpm", NoiseSchedule.linear(T=10), 5, prediction="score")


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_samplers_recover_a_known_signal_with_a_v_or_x0_oracle(prediction):
    """An oracle network of each parameterization (the data is one known image): every sampler returns it,
    over the published schedule and a 20-step sub-sequence, with and without the clamp."""
    from cpvs.models.diffusion.prediction import training_target

    s = NoiseSchedule.linear()
    target = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(5))

    def oracle(y, t):
        g = s.gamma(t).view(-1, 1, 1, 1)
        noise = (y - g.sqrt() * target) / (1 - g).sqrt()
        return training_target(prediction, target, noise, s.gamma(t))

    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    wide = (torch.full((1, 2, 1, 1), -10.0), torch.full((1, 2, 1, 1), 10.0))
    for rng in (None, wide):
        for name, steps in (("ddim", 20), ("dpmpp", 10), ("ddpm", 20)):
            out = make_sampler(name, s, steps, x0_range=rng, prediction=prediction).sample(
                oracle, noise, lambda i: torch.randn(1, 2, 4, 4))
            torch.testing.assert_close(out, target, rtol=1e-3, atol=1e-3)


def test_the_trajectory_callback_sees_every_step_and_its_clean_image():
    s = NoiseSchedule.linear(T=100, start=1e-4, end=0.05)
    seen = []
    sampler = make_sampler("ddpm", s, 7, prediction="x0")
    target = torch.ones(1, 2, 3, 3)
    sampler.sample(lambda y, t: target, torch.randn(1, 2, 3, 3), lambda i: torch.zeros(1, 2, 3, 3),
                   callback=lambda i, t, y, x0: seen.append((i, t, float(x0.mean()))))
    assert [i for i, _, _ in seen] == list(range(7)) and [t for _, t, _ in seen] == sampler.steps
    assert all(v == pytest.approx(1.0) for _, _, v in seen)


def test_std_error_spearman_ranks_pixels_by_error():
    from cpvs.evaluate.uncertainty import std_error_spearman

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(64, 64))
    std = rng.uniform(0.1, 2.0, size=(64, 64))
    pred = truth + std * rng.normal(size=(64, 64))  # errors drawn with that std: the map ranks them
    assert 0.3 < std_error_spearman(std, pred, truth) < 0.9
    assert abs(std_error_spearman(rng.uniform(size=(64, 64)), pred, truth)) < 0.1
    assert np.isnan(std_error_spearman(np.zeros((8, 8)), pred[:8, :8], truth[:8, :8]))
    # exact values: any increasing function of |error| is 1, a decreasing one -1, and a hand-ranked case
    err = np.abs(pred - truth)
    assert std_error_spearman(err**2 + 1, pred, truth) == pytest.approx(1.0)
    assert std_error_spearman(1 / (err + 1), pred, truth) == pytest.approx(-1.0)
    # ranks of std 1 2 3 4 against |error| ranks 1 3 2 4: 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/60
    t4 = np.zeros((2, 2))
    assert std_error_spearman(np.array([[1, 2], [3, 4]]), np.array([[-1, 3], [2, -4]]), t4) == pytest.approx(0.8)
    # beyond max_pixels an evenly strided subsample is ranked
    assert std_error_spearman(err**2, pred, truth, max_pixels=500) == pytest.approx(1.0)


def test_evaluate_images_reports_the_std_maps_spearman_per_field_and_channel(tmp_path):
    """A predicted plate with <stain>_std maps gets std_spearman per field and channel, the Spearman
    correlation of the map with |prediction − truth| in the files' own units; plates without maps do not."""
    from scipy.stats import spearmanr

    from cpvs.evaluate.images import evaluate_images
    from cpvs.plate import write_image

    stains = ["DNA", "ER", "RNA", "AGP", "Mito"]
    rng = np.random.default_rng(1)
    truth, pred, pred_plain = tmp_path / "truth", tmp_path / "pred", tmp_path / "plain"
    for d, names in ((truth, stains), (pred, stains + [f"{c}_std" for c in stains]), (pred_plain, stains)):
        d.mkdir()
        (d / "channel_map.csv").write_text("channel,name\n" + "".join(f"{i + 1},{n}\n" for i, n in enumerate(names)))
    expected = {}
    for site in (1, 2):
        for i, c in enumerate(stains):
            y = rng.integers(1000, 3000, size=(48, 40)).astype(np.uint16)
            std = rng.uniform(1, 400, size=y.shape)
            if c == "Mito":  # a map unrelated to the error
                x = y + rng.normal(0, 100, size=y.shape)
            else:  # errors drawn with that std
                x = y + std * rng.normal(size=y.shape)
            x = np.clip(x, 0, 65535).astype(np.uint16)
            name = f"r01c01f{site:02d}p01-ch{{}}sk1fk1fl1.tiff"
            write_image(truth / name.format(i + 1), y)
            for d in (pred, pred_plain):
                write_image(d / name.format(i + 1), x)
            write_image(pred / name.format(i + 6), std.astype(np.float32))
            expected[(site, c)] = spearmanr(std.astype(np.float32).ravel(), np.abs(x.astype(float) - y).ravel()).statistic
    ev = evaluate_images(pred, truth, truth_illum_size=0, workers=1)
    assert ev.channels == stains
    got = {(int(r.Metadata_Site), r.channel): r.std_spearman for r in ev.per_field.itertuples()}
    assert got == pytest.approx(expected)
    summary = ev.summary.set_index("channel")
    assert summary.loc["DNA", "std_spearman_mean"] > 0.3 and abs(summary.loc["Mito", "std_spearman_mean"]) < 0.1
    assert summary.loc["all", "std_spearman_mean"] == pytest.approx(np.mean(list(expected.values())))
    plain = evaluate_images(pred_plain, truth, truth_illum_size=0, workers=1)
    assert "std_spearman" not in plain.per_field and "std_spearman_mean" not in plain.summary


@pytest.mark.slow
def test_residual_diffusion_predicts_the_unet_plus_its_residual_and_needs_that_unet(sim_root, tmp_path):
    """A residual checkpoint records its U-Net (path, digest, scale) and is conditioned on it; an x0-model
    that predicts a zero residual (untrained: zero-initialized output, lr 0) gives exactly the U-Net's
    prediction through predict-plate; a missing or different U-Net is refused by name."""
    from cpvs.checkpoints import load_checkpoint
    from cpvs.plate import discover_plate, discover_plates, read_image
    from cpvs.predict.runner import PredictConfig, predict_plate
    from cpvs.preprocess.pipeline import preprocess_plates
    from cpvs.train.diffusion import DiffusionConfig, train_diffusion
    from cpvs.train.staining import StainingConfig, train_staining

    plates = [p for d in sorted(sim_root.glob("SIM3-P*")) for p in discover_plates(d)]
    preprocess_plates(plates[:1], tmp_path / "s.zarr", size=(64, 64))
    unet = dict(depth=3, width=8, crop=32, batch_size=2, steps_per_epoch=2, device="cpu", workers=1)
    train_staining(StainingConfig("unet", tmp_path / "s.zarr", tmp_path / "unet", epochs=1, **unet))
    train_staining(StainingConfig("unet", tmp_path / "s.zarr", tmp_path / "unet2", epochs=1, seed=1, **unet))
    net = dict(width=16, channel_mult=(1, 2), num_res_blocks=1, attention_downsample=(2,), head_channels=16, dropout=0.0,
               schedule={"kind": "linear", "T": 100, "start": 1e-4, "end": 0.05}, crop=32, batch_size=2, steps_per_epoch=2,
               device="cpu", workers=1, epochs=1)
    train_diffusion(DiffusionConfig("ddpm", tmp_path / "s.zarr", tmp_path / "res", prediction="x0", lr=0.0,
                                    residual_of=tmp_path / "unet", **net))
    ck = load_checkpoint(tmp_path / "res")
    rec = ck["hparams"]["residual_of"]
    assert ck["hparams"]["prediction"] == "x0" and ck["hparams"]["net"]["in_channels"] == 3 + 5
    assert rec["checkpoint"].endswith(".pt") and len(rec["sha256"]) == 16 and len(rec["scale"]) == 5
    assert all(0 < v for v in rec["scale"])
    shrink = ck["residual_shrink"]  # the ddpm's validation crops lie in the U-Net's validation band: fitted there
    assert shrink["held_out"] is True and set(shrink["alpha"]) == set(ck["outputs"])
    assert all(a == 0 for a in shrink["alpha"].values())  # a zero estimate carries no weight
    plate = sim_root / "SIM3-P01"
    common = dict(device="cpu", shard=(1, 6), dtype="float32")
    predict_plate(PredictConfig(plate, tmp_path / "p-unet", tmp_path / "unet", **common))
    predict_plate(PredictConfig(plate, tmp_path / "p-res", tmp_path / "res", steps=5, samples=2, **common))
    a, b = discover_plate(tmp_path / "p-unet"), discover_plate(tmp_path / "p-res")
    for fa, fb in zip(a.fields, b.fields):
        for c in ("DNA", "Mito"):
            np.testing.assert_allclose(read_image(fb.files[c]), read_image(fa.files[c]), rtol=1e-4, atol=1e-2)
            assert read_image(fb.files[f"{c}_std"]).max() == pytest.approx(0, abs=1e-3)
    # a trained residual: --no-shrink adds it whole; a factor of 0 gives the U-Net's prediction with the same std maps
    train_diffusion(DiffusionConfig("ddpm", tmp_path / "s.zarr", tmp_path / "res2", prediction="x0", lr=1e-2,
                                    residual_of=tmp_path / "unet", **net))
    alpha = load_checkpoint(tmp_path / "res2")["residual_shrink"]["alpha"]
    assert all(0 <= a <= 1 for a in alpha.values())
    assert pd.read_parquet(tmp_path / "res2" / "metrics.parquet")["shrink_DNA"].iloc[-1] == pytest.approx(alpha["DNA"])
    raw = torch.load(tmp_path / "res2" / "checkpoints" / "last.pt", weights_only=False)
    raw["residual_shrink"]["alpha"] = {c: 0.0 for c in raw["outputs"]}
    (tmp_path / "res0" / "checkpoints").mkdir(parents=True)
    torch.save(raw, tmp_path / "res0" / "checkpoints" / "last.pt")
    mean = dict(steps=3, samples=2, estimate="mean", **common)
    predict_plate(PredictConfig(plate, tmp_path / "p-whole", tmp_path / "res2", shrink=False, **mean))
    predict_plate(PredictConfig(plate, tmp_path / "p-zero", tmp_path / "res0", **mean))
    w, z = discover_plate(tmp_path / "p-whole"), discover_plate(tmp_path / "p-zero")
    for fa, fw, fz in zip(a.fields, w.fields, z.fields):
        np.testing.assert_allclose(read_image(fz.files["DNA"]), read_image(fa.files["DNA"]), rtol=1e-4, atol=1e-2)
        assert np.abs(read_image(fw.files["DNA"]) - read_image(fa.files["DNA"])).max() > 1
        np.testing.assert_array_equal(read_image(fz.files["DNA_std"]), read_image(fw.files["DNA_std"]))
        assert read_image(fw.files["DNA_std"]).max() > 0
    with pytest.raises(CpvsError, match="--shrink"):  # a staining checkpoint has no residual to weigh
        predict_plate(PredictConfig(plate, tmp_path / "p6", tmp_path / "unet", shrink=False, **common))
    # the U-Net moved: refused with what to do; found again with --residual-unet; another U-Net is refused
    shutil.move(tmp_path / "unet", tmp_path / "moved")
    with pytest.raises(CpvsError, match="which is not there") as e:
        predict_plate(PredictConfig(plate, tmp_path / "p2", tmp_path / "res", steps=2, **common))
    assert "--residual-unet" in e.value.render()
    predict_plate(PredictConfig(plate, tmp_path / "p3", tmp_path / "res", steps=2, residual_unet=tmp_path / "moved", **common))
    with pytest.raises(CpvsError, match="not the U-Net this model was trained on"):
        predict_plate(PredictConfig(plate, tmp_path / "p4", tmp_path / "res", steps=2, residual_unet=tmp_path / "unet2", **common))
    with pytest.raises(CpvsError, match="--residual-unet"):  # a staining checkpoint
        predict_plate(PredictConfig(plate, tmp_path / "p5", tmp_path / "moved", residual_unet=tmp_path / "unet2", **common))
    from cpvs.predict.config import DiffusionOptions
    from cpvs.predict.diffusion import load_residual

    with pytest.raises(CpvsError, match="--residual-unet applies to residual diffusion"):  # a plain ddpm checkpoint
        load_residual({"hparams": {}, "path": "ddpm.pt"}, DiffusionOptions(residual_unet=tmp_path / "unet2"), "cpu", "fp32")
    # the CLI takes the new options, and refuses them for other families
    r = runner.invoke(app, ["train", "--model", "unet", "--data", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "x"),
                            "--prediction", "v"])
    assert r.exit_code != 0 and "--prediction" in r.output


def test_residual_shrinkage_is_the_least_squares_weight_of_the_estimate_clipped_to_0_1():
    """The weight of the network's last-step residual estimate: the least-squares α per channel (an estimate
    of 2·r gets 0.5, of r/2 is capped at 1, of −r or 0 gets 0), whatever noise the estimate sees."""
    from cpvs.train.residual import fit_shrinkage

    r = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    gains = torch.tensor([2.0, 0.5, -1.0, 0.0]).view(1, -1, 1, 1)

    class Fake(torch.nn.Module):  # an x0-network whose estimate is gain·r, r carried in the condition
        def forward(self, x, y_t, gamma, labels):
            return gains * x

    schedule = NoiseSchedule.linear(100, 1e-4, 0.05)
    alpha = fit_shrinkage(Fake(), r, r, schedule, "x0", "fp32", seed=0)
    np.testing.assert_allclose(alpha, [0.5, 1.0, 0.0, 0.0], atol=1e-6)
    noisy = r + 0.5 * torch.randn(r.shape, generator=torch.Generator().manual_seed(1))  # estimate = r + noise
    alpha = fit_shrinkage(Fake(), noisy, r, schedule, "x0", "fp32", seed=0)
    expected = ((r * noisy * gains).sum((0, 2, 3)) / ((noisy * gains) ** 2).sum((0, 2, 3))).clamp(0, 1).numpy()
    np.testing.assert_allclose(alpha[:3], expected[:3], rtol=1e-5, atol=1e-7)
    assert alpha[3] == 0  # an estimate of zero carries no weight (no 0/0)
    assert alpha[0] == pytest.approx(0.5 / 1.25, abs=0.03)  # noise of variance 1/4 shrinks 2·r's weight to 0.5 / (1 + 1/4)
