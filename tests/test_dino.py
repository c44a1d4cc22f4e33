"""Self-supervised profiling: multi-crop views, the WS-DINO sampler, ViT weights, training, embeddings, TVN."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.embed.embedding import central_crops, tvn
from cpvs.errors import CpvsError
from cpvs.models.vit import build_backbone, cls_attention, load_init_weights
from cpvs.preprocess.store import Store
from cpvs.checkpoints import load_checkpoint
from cpvs.train.dino import DinoConfig, dino_loss, lr_at, train_dino
from cpvs.train.multicrop import CropSpec, PairSampler, crop_box, views_for_batch

runner = CliRunner()
TINY = dict(arch="vit_tiny_patch16_224", out_dim=256, hidden=64, bottleneck=32,
            crops=CropSpec(2, 64, (0.1, 0.2), 3, 32, (0.04, 0.08)), batch_size=3, lr=1e-3, min_lr=1e-4,
            warmup_epochs=1, device="cpu")


def test_ws_dino_sampler_pairs_different_images_with_equal_labels():
    fields = list(range(12))
    labels = ["a", "a", "a", "b", "b", "c", "d", "d", "d", "d", "e", "e"]
    s = PairSampler(fields, labels)
    assert s.excluded == ["c"]  # a label with one image cannot be paired
    pairs = s.sample(np.random.default_rng(0), 2000)
    assert all(g != p and labels[g] == labels[p] for g, p in pairs)
    counts = pd.Series([labels[g] for g, _ in pairs]).value_counts()
    assert counts.min() > 0.8 * counts.max()  # balanced over labels, not over images
    dino = PairSampler(fields).sample(np.random.default_rng(0), 50)
    assert all(g == p for g, p in dino)
    with pytest.raises(CpvsError, match="no weak label"):
        PairSampler([0, 1], ["x", "y"])


def test_crops_have_the_configured_sizes_and_scales(sim_store):
    rng = np.random.default_rng(1)
    for scale in ((0.1, 0.2), (0.04, 0.08)):
        for _ in range(200):
            y, x, h, w = crop_box(rng, 998, 998, scale)
            assert 0 <= y and y + h <= 998 and 0 <= x and x + w <= 998
            frac = h * w / 998**2
            assert scale[0] * 0.97 <= frac <= scale[1] * 1.03
            assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    store = Store(sim_store)
    spec = CropSpec(2, 64, (0.1, 0.2), 3, 32, (0.04, 0.08))
    views = views_for_batch(store, rng, [(0, 1), (2, 3)], "DNA", spec)
    assert [tuple(v.shape) for v in views] == [(2, 1, 64, 64)] * 2 + [(2, 1, 32, 32)] * 3


def test_dino_loss_and_schedule():
    torch.manual_seed(0)
    t = torch.randn(2 * 4, 16)
    s = torch.randn(5 * 4, 16)
    loss = dino_loss(s, t, torch.zeros(16), n_global=2, n_crops=5, student_temp=0.1, teacher_temp=0.04)
    assert loss > 0
    # A student that reproduces the teacher's sharpened distribution scores lower than a random one.
    s_good = torch.cat([t[4:], t[:4], t, t[:4]]) * (0.1 / 0.04)
    assert dino_loss(s_good, t, torch.zeros(16), 2, 5, 0.1, 0.04) < loss
    assert lr_at(0, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(99, 100, 10, 1.0, 0.1) == pytest.approx(0.1, abs=1e-3)


def test_timm_state_dict_from_a_local_file_is_adapted_to_one_channel(tmp_path):
    import timm

    rgb = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=3)
    path = tmp_path / "rgb.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in rgb.state_dict().items()}}, path)  # DINO-style wrapping
    gray = build_backbone("vit_tiny_patch16_224", img_size=112)
    notes = load_init_weights(gray, path)
    sd = gray.state_dict()
    assert torch.allclose(sd["patch_embed.proj.weight"], rgb.state_dict()["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert torch.equal(sd["blocks.3.attn.qkv.weight"], rgb.state_dict()["blocks.3.attn.qkv.weight"])
    assert "patch_embed" in notes and "pos_embed" in notes
    x = torch.rand(1, 1, 112, 112)
    with torch.no_grad():  # a grey image replicated to RGB gives the same embedding
        rgb112 = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=3, img_size=112)
        load = {k: v for k, v in gray.state_dict().items() if k != "patch_embed.proj.weight"}
        rgb112.load_state_dict({**load, "patch_embed.proj.weight": rgb.state_dict()["patch_embed.proj.weight"]})
        assert torch.allclose(gray.eval()(x), rgb112.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4)
    with pytest.raises(CpvsError, match="not found"):
        load_init_weights(gray, tmp_path / "missing.pth")


def test_cls_attention_is_a_distribution_over_patches():
    vit = build_backbone("vit_tiny_patch16_224", img_size=64).eval()
    att = cls_attention(vit, torch.rand(2, 1, 64, 64))
    assert att.shape == (2, vit.blocks[-1].attn.num_heads, 4, 4)
    assert torch.all(att >= 0) and torch.all(att.flatten(2).sum(-1) <= 1 + 1e-5)


def test_tvn_makes_control_covariance_the_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3
    df = pd.DataFrame(x, columns=[f"Emb_DNA_{i}" for i in range(6)])
    df["Metadata_ControlType"] = np.where(np.arange(200) < 120, "negcon", "trt")
    out, names = tvn(df, list(df.columns[:6]), (df["Metadata_ControlType"] == "negcon").to_numpy())
    ctrl = out.loc[out["Metadata_ControlType"] == "negcon", names].to_numpy()
    np.testing.assert_allclose(np.cov(ctrl, rowvar=False), np.eye(6), atol=1e-8)
    np.testing.assert_allclose(ctrl.mean(0), 0, atol=1e-9)


def test_central_crops_tile_the_central_square():
    img = np.arange(1 * 500 * 500, dtype=np.float32).reshape(1, 500, 500)
    crops = central_crops(img)
    assert crops.shape == (4, 1, 224, 224)
    assert np.array_equal(crops[3, 0], img[0, 26 + 224 : 26 + 448, 26 + 224 : 26 + 448])
    with pytest.raises(CpvsError, match="448"):
        central_crops(img[:, :300, :300])


@pytest.mark.slow
def test_ws_dino_trains_resumes_and_embeds(sim_root, tmp_path):
    from cpvs.plate import discover_plates
    from cpvs.preprocess.pipeline import preprocess_plates

    plates = [p for d in sorted(sim_root.glob("SIM3-P*")) for p in discover_plates(d)]
    store = tmp_path / "s.zarr"
    preprocess_plates(plates, store, size=(448, 448))
    cfg = dict(TINY, channels=["DNA", "AGP"], steps_per_epoch=2)
    a = train_dino(DinoConfig("ws-dino", store, tmp_path / "a", epochs=2, **cfg))
    train_dino(DinoConfig("ws-dino", store, tmp_path / "b", epochs=1, **cfg))
    train_dino(DinoConfig("ws-dino", store, tmp_path / "b", epochs=2, resume=True, **cfg))
    wa, wb = (load_checkpoint(p / "checkpoints" / "last.pt")["state_dict"] for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert list(a.metrics["epoch"]) == [1, 2] and np.isfinite(a.metrics["loss"]).all()
    r = runner.invoke(app, ["--device", "cpu", "embed", str(store), "--checkpoint", str(tmp_path / "a"),
                            "-o", str(tmp_path / "emb" / "e.parquet"), "--attention-maps", str(tmp_path / "att"), "--n", "2"])
    assert r.exit_code == 0, r.output
    emb = pd.read_parquet(tmp_path / "emb" / "e.parquet")
    cols = [c for c in emb.columns if c.startswith("Emb_")]
    assert cols[0] == "Emb_DNA_0" and cols[-1] == "Emb_AGP_191" and len(cols) == 2 * 192
    np.testing.assert_allclose(np.linalg.norm(emb[cols].to_numpy(), axis=1), 1, atol=1e-6)
    assert len(pd.read_parquet(tmp_path / "emb" / "e_well.parquet")) == 12
    assert len(list((tmp_path / "att").glob("*.png"))) == 2
    r = runner.invoke(app, ["embed", str(store), "--checkpoint", str(tmp_path / "a"), "-o", str(tmp_path / "x.parquet"),
                            "--channels", "Mito"])
    assert r.exit_code == 2 and "no model for Mito" in r.output
    # A cpvs DINO checkpoint is a FID feature network (it raised an ImportError before).
    plate = sim_root / "SIM3-P01"
    r = runner.invoke(app, ["--device", "cpu", "evaluate", "--fid", "--pred", str(plate), "--truth", str(plate), "--channels",
                            "DNA,AGP", "--fid-network", str(tmp_path / "a" / "checkpoints" / "last.pt"), "--json"])
    assert r.exit_code == 0, r.output
    fid = json.loads(r.output)["fid"]
    assert set(fid) == {"DNA", "AGP"} and all(abs(v) < 1e-3 for v in fid.values())  # a plate against itself
    r = runner.invoke(app, ["evaluate", "--fid", "--pred", str(plate), "--truth", str(plate), "--channels", "Mito",
                            "--fid-network", str(tmp_path / "a")])
    assert r.exit_code == 2 and "no ViT for Mito" in r.output
