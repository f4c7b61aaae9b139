"""Tests for decode.py: decoder shapes, learning a known map, early stopping, the tie to the world-model
checkpoint, the code picture, and end-to-end runs on a tiny trained vq / baseline run (CPU, seconds)."""
import json

import cv2
import numpy as np
import pytest
import torch

import data
import decode
import dino
import train
import wm
from decode import ActionDecoder, DecodeConfig, draw_codes, fit_decoder, load_decoder, predict

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids OpenMP spin-waits when the 2 cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linear_pairs(n, W, gen, sign=1.0):
    """Synthetic decoder data: random tokens (N, 4, 8), latents z (N, 4), targets y = sign * z W (N, 10)."""
    z = torch.randn(n, 4, generator=gen)  # (N, L)
    return {"p": torch.randn(n, 4, 8, generator=gen).half(), "z": z, "y": sign * z @ W}  # (N, P, D), (N, A)


def test_decoder_shapes_and_branches():
    torch.manual_seed(0)
    p, z = torch.randn(3, 7, 16), torch.randn(3, 4)  # (B, P, D), (B, L)
    plain, delta = ActionDecoder(16, 4, 10), ActionDecoder(16, 4, 10, use_delta=True)
    assert plain(p, z).shape == (3, 10) and delta(p, z, torch.randn(3, 7, 16)).shape == (3, 10)
    # The disabled branch is a learned constant, so the head always sees 128 + 128 + L features (seed).
    assert plain.head[1].in_features == delta.head[1].in_features == 2 * 128 + 4
    assert hasattr(plain, "d_const") and not hasattr(plain, "proj_d") and hasattr(delta, "proj_d")
    # Attention pooling is a convex combination: equal patches pool to that patch.
    same = torch.randn(2, 1, 16).expand(2, 7, 16)  # (B, P, D)
    assert torch.allclose(plain.pool(same), same[:, 0], atol=1e-5)


def test_learns_linear_latent_to_action_map():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 10, generator=gen)  # (L, A)
    train, val = linear_pairs(1024, W, gen), linear_pairs(256, W, gen)
    torch.manual_seed(0)
    dec = ActionDecoder(8, 4, 10)
    hist = fit_decoder(dec, train, val, DecodeConfig(batch_size=64, lr=1e-2, max_epochs=10), CPU, gen)
    rmse = (predict(dec, val, CPU) - val["y"]).pow(2).mean().sqrt().item()
    assert rmse < 0.1 * val["y"].std().item(), hist[-3:]


def test_early_stopping_restores_best_weights():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(4, 10, generator=gen)  # (L, A)
    # Val targets are the negated train targets, so fitting the train set makes val RMSE worse: stop early.
    train, val = linear_pairs(256, W, gen), linear_pairs(128, W, gen, sign=-1.0)
    torch.manual_seed(0)
    dec = ActionDecoder(8, 4, 10)
    cfg = DecodeConfig(batch_size=64, max_epochs=50, patience=3)
    hist = fit_decoder(dec, train, val, cfg, CPU, gen)
    best = min(hist, key=lambda h: h["val_rmse"])
    assert len(hist) == best["epoch"] + cfg.patience < cfg.max_epochs
    final = (predict(dec, val, CPU) - val["y"]).pow(2).mean().sqrt().item()
    assert abs(final - best["val_rmse"]) < 1e-5 and final < hist[-1]["val_rmse"]


def test_decoder_is_tied_to_world_model_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="decode.py"):
        load_decoder(tmp_path, {"ckpt_id": "a1"}, CPU)
    dec = ActionDecoder(8, 4, 10)
    arch = dict(visual_dim=8, latent_dim=4, action_dim=10, use_delta=False)
    torch.save({"model": dec.state_dict(), "config": {"arch": arch}, "wm_ckpt_id": "a1", "report": {}},
               tmp_path / "decoder.pt")
    p, z = torch.randn(2, 3, 8), torch.randn(2, 4)
    assert torch.allclose(load_decoder(tmp_path, {"ckpt_id": "a1"}, CPU)(p, z), dec(p, z))
    with pytest.raises(ValueError, match="retrained"):
        load_decoder(tmp_path, {"ckpt_id": "b2"}, CPU)


def test_code_picture_layout():
    steps = np.zeros((10, 5, 2))  # (K, F, 2)
    steps[3, :, 0] = 10.0  # code 3 pushes right by 50 px in total
    img = draw_codes(steps, np.array([5, 0, 1, 9, 0, 0, 2, 0, 0, 1]), "test", cols=4, cell=100)
    assert img.shape == (60 + 3 * 100, 400, 3) and img.dtype == np.uint8
    cell3 = img[60:160, 300:400]  # code 3: row 0, column 3; its arrow is drawn in colour (B > R)
    assert ((cell3[..., 0].astype(int) - cell3[..., 2]) > 100).sum() > 20


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny dataset with a cached random-DINO feature file, and a vq and a baseline run trained 2 steps on it."""
    root = tmp_path_factory.mktemp("decode")
    data.collect(root / "data", episodes=6, steps=40, img_size=28)
    dino.main(dino.Config(data=str(root / "data"), dino_weights="random", size=28, device="cpu"))
    for variant in ("vq", "baseline"):
        train.main(train.TrainConfig(data=str(root / "data"), out=str(root / variant), steps=2, batch_size=4,
                                     eval_every=2, val_batches=1, stats_batches=1, log_every=1, num_workers=0,
                                     device="cpu", dino_weights="random", dino_size=28),
                   wm.WMConfig(variant=variant, depth=1, heads=2, dim_head=8, mlp_dim=32, idm_depth=1, idm_heads=2,
                               idm_dim=16, idm_mlp_dim=32, cond_dim=8, latent_dim=8, num_codes=4))
    return root


def tiny_decode(run, **kw):
    return DecodeConfig(run=str(run), pairs=64, val_pairs=16, max_epochs=2, code_states=8, workers=0, device="cpu", **kw)


def test_decode_main_vq_writes_decoder_report_and_codes(tiny_runs):
    run = tiny_runs / "vq"
    report = decode.main(tiny_decode(run))
    assert report["label_budget"]["train_pairs"] == 64 and len(report["r2_per_dim"]) == 10
    assert json.loads((run / "decode.json").read_text())["val_rmse_px"] == pytest.approx(report["val_rmse_px"])
    assert [c["code"] for c in report["codes"]] == [0, 1, 2, 3] and sum(c["usage"] for c in report["codes"]) == 16
    assert np.array(report["codes"][0]["mean_action_px"]).shape == (5, 2)
    img = cv2.imread(str(run / "codes.png"))
    assert img is not None and img.shape[0] > 100
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    decoder = load_decoder(run, ckpt, CPU)
    assert decoder(torch.randn(2, 4, 384), torch.randn(2, 8)).shape == (2, 10)
    # Retraining the world model changes ckpt_id: the old decoder must be refused.
    with pytest.raises(ValueError, match="retrained"):
        load_decoder(run, {**ckpt, "ckpt_id": "new"}, CPU)


def test_decode_baseline_and_bad_inputs(tiny_runs, tmp_path):
    assert decode.main(tiny_decode(tiny_runs / "baseline")) is None
    assert not (tiny_runs / "baseline" / "decoder.pt").exists() and not (tiny_runs / "baseline" / "decode.json").exists()
    with pytest.raises(FileNotFoundError, match="train.py"):
        decode.main(tiny_decode(tmp_path))
    # A run whose dataset changed since training (fingerprint differs): refused, nothing written.
    ckpt = torch.load(tiny_runs / "vq" / "ckpt.pt", weights_only=True)
    ckpt["data"]["fingerprint"] = "0" * 16
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="fingerprint"):
        decode.main(tiny_decode(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
