"""Tests of wm.py and train.py on CPU with tiny sizes: python -m pytest -q tests_wm.py --durations=5"""
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import dino
import train
import wm
from wm import WMConfig, WorldModel

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: OpenMP threads only add overhead, and on a busy 2-core box they spin (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(visual_dim=16, num_patches=4, cond_dim=8, latent_dim=8, proprio_dim=3, depth=2, heads=2, dim_head=8,
            mlp_dim=32, idm_depth=1, idm_heads=2, idm_dim=16, idm_mlp_dim=32, num_codes=4)


def tiny(variant="baseline", **kw):
    return WMConfig(variant=variant, **{**TINY, **kw})


def batch(B=6, T=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 4, 16, generator=g), torch.randn(B, T, 10, generator=g), torch.randn(B, T, 4, generator=g)


def make_dataset(root, img_size=28, dino_size=28, episodes=(4, 2), length=24, dim=16):
    """A tiny dataset in data.py's layout, written by hand (no simulator), plus a matching feature cache."""
    rng = np.random.default_rng(0)
    meta = {"format": "pusht-v1", "source": "test", "img_size": img_size, "seed": 0, "fingerprint": "0123456789abcdef",
            "splits": {s: {"episodes": E, "frames": E * length} for s, E in zip(("train", "val"), episodes)},
            "action_mean": [0.0, 0.0], "action_std": [20.0, 20.0],
            "proprio_mean": [256.0, 256.0, 0.0, 0.0], "proprio_std": [100.0, 100.0, 50.0, 50.0]}
    (Path(root)).mkdir(parents=True)
    (Path(root) / "meta.json").write_text(json.dumps(meta))
    for split, E in zip(("train", "val"), episodes):
        d, F = Path(root) / split, E * length
        d.mkdir()
        states = np.concatenate([rng.uniform(100, 400, (F, 4)), rng.uniform(0, 6, (F, 1)), rng.normal(0, 50, (F, 2))], 1)
        np.save(d / "states.npy", states.astype(np.float64))
        np.save(d / "actions.npy", rng.normal(0, 20, (F, 2)).astype(np.float32))
        np.save(d / "lengths.npy", np.full(E, length, np.int64))
        np.save(d / "features.npy", rng.normal(0, 1, (F, (dino_size // 14) ** 2, dim)).astype(np.float16))
        head = dino.cache_header(root, "dinov2_vits14", dino_size, "random")  # dino.py's header format
        (d / "features.json").write_text(json.dumps({**head, "frames": F, "done": F}))
    return root


def train_cfgs(root, out, variant="vq", steps=6, **kw):
    cfg = train.TrainConfig(data=str(root), out=str(out), steps=steps, batch_size=4, eval_every=3, val_batches=2,
                            stats_batches=2, log_every=2, num_workers=0, device="cpu", dino_weights="random",
                            dino_size=28, lr_predictor=1e-3, lr_action=1e-3, lr_idm=1e-3, **kw)
    return cfg, tiny(variant, cond_dim=8, latent_dim=8)


def test_shapes_every_variant():
    for variant in ("baseline", "la", "vq"):
        for n, proprio in ((1, False), (3, True)):
            m = WorldModel(tiny(variant, num_hist=n, proprio=proprio))
            z, a, p = batch(T=n + 1)
            out = m(z, a, p)
            assert out["loss"].shape == () and out["cond"].shape == (6, n + 1, 8)
            if variant != "baseline":
                assert m.idm(z).shape == (6, n + 1, 16) and out["latent"].shape == (6, n, 8)
            if variant == "vq":
                assert out["codes"].shape == (6, n) and out["commit_loss"].shape == ()
            obs = m.observe(z, p)
            assert obs.shape == (6, n + 1, 4, 16 + 3 * proprio)
            assert m.predict(obs[:, :n], out["cond"][:, :n]).shape == (6, n, 4, 16 + 3 * proprio)
            plan = {"baseline": a[:, :1].expand(-1, 5, -1), "la": torch.randn(6, 5, 8),
                    "vq": torch.randint(4, (6, 5))}[variant]
            cond = m.plan_to_cond(plan)
            assert cond.shape == (6, 5, 8)
            zs, ps = m.rollout(z[:, 0], cond, p[:, 0] if proprio else None)
            assert zs.shape == (6, 5, 4, 16) and (ps.shape == (6, 5, 3) if proprio else ps is None)
            assert (m.embed_proprio(p).shape == (6, n + 1, 3)) if proprio else m.embed_proprio(p) is None


def test_frame_causal_mask():
    mask = wm.frame_causal_mask(2, 3)
    assert mask.int().tolist()[1] == [1, 1, 0, 0, 0, 0] and mask[5].all() and not mask[0, 2:].any()
    m = WorldModel(tiny(num_hist=3)).eval()
    x = torch.randn(2, 3, 4, 16 + 8)
    y = x.clone()
    y[:, 2] = torch.randn(2, 4, 24)  # change the last frame only (not by a constant: LayerNorm would remove it)
    a, b = m.predictor(x), m.predictor(y)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6) and not torch.allclose(a[:, 2], b[:, 2])
    # the IDM's temporal attention is causal too: u[t] never sees frames after t
    m = WorldModel(tiny("la", num_hist=3)).eval()
    z = torch.randn(2, 4, 4, 16)
    z2 = z.clone()
    z2[:, 3] = torch.randn(2, 4, 16)
    assert torch.allclose(m.idm(z)[:, :3], m.idm(z2)[:, :3], atol=1e-5)


def test_vq_straight_through_and_ema():
    torch.manual_seed(0)
    vq = wm.VectorQuantizer(4, 8, ema_decay=1.0, commitment=0.05)  # decay 1: the EMA keeps the initial codebook
    x = (torch.randn(64, 8) + 3 * torch.randn(4, 8).repeat(16, 1)).requires_grad_()  # (64, 8), 4 clusters
    q, codes, commit = vq(x)
    # first training batch initialises E = m = 4 of its inputs, n = 1 (consistent EMA state)
    assert vq.initialised and all((x.detach() - e).abs().sum(1).min() == 0 for e in vq.embedding)
    assert torch.equal(vq.embedding, vq.embedding_avg) and torch.allclose(q.detach(), vq.embedding[codes], atol=1e-6)
    assert torch.allclose(commit, 0.05 * ((x - q) ** 2).mean())
    w = torch.randn_like(q)
    (q * w).sum().backward()
    assert torch.equal(x.grad, w)  # straight-through: identity gradient to the encoder output
    vq.decay = 0.9
    # EMA moves the assigned codes toward the mean of their inputs
    xd = x.detach()
    gap = lambda: sum(((vq.embedding[k] - xd[codes == k].mean(0)).norm() for k in codes.unique()))  # noqa: E731
    before = gap()
    for _ in range(20):
        _, codes, _ = vq(xd)
    assert gap() < 0.2 * before
    # gradient reaches the IDM through the quantiser
    m = WorldModel(tiny("vq"))
    z, a, p = batch()
    m(z, a, p)["loss"].backward()
    assert m.idm.blocks[0].ff[1].weight.grad.abs().sum() > 0 and m.latent_action_down.weight.grad.abs().sum() > 0


def test_dead_code_restart_resets_stats():
    torch.manual_seed(0)
    vq = wm.VectorQuantizer(4, 8, ema_decay=0.99, commitment=0.05)
    x = torch.randn(32, 8)
    vq(x)
    vq.embedding[3] = 1e3  # never selected
    vq.embedding_avg[3] = 1e3 * 1e-5
    vq.cluster_size[3] = 1e-5  # s_3 < 1e-3: dead
    vq(x)
    assert (vq.embedding[3] - x).abs().sum(1).min() == 0  # revived as an input of this batch
    assert vq.cluster_size[3] == 1 and torch.equal(vq.embedding_avg[3], vq.embedding[3])
    revived = vq.embedding[3].clone()
    vq.embedding[3] = revived  # next update: stays put (not reverted to the stale m / n)
    vq(x + 100)  # everything now far away; code 3 may or may not be picked, but must not jump back to 1e3
    assert vq.embedding[3].abs().max() < 200


@pytest.mark.parametrize("variant", ["baseline", "la", "vq"])
def test_overfit_one_batch(variant):
    torch.manual_seed(0)
    m = WorldModel(tiny(variant, dropout=0.0, mlp_dim=64))
    z, a, p = batch(B=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        out = m(z, a, p)
        loss = out["pred_loss"]
        first = first or loss.item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert loss.item() < first / 10, (variant, first, loss.item())


def test_rollout_equals_single_steps():
    torch.manual_seed(0)
    m = WorldModel(tiny("baseline", num_hist=3, proprio=True)).eval()
    z0, p0, cond = torch.randn(2, 4, 16), torch.randn(2, 4), torch.randn(2, 5, 8)
    zs, ps = m.rollout(z0, cond, p0)
    frames = [torch.cat([z0, m.embed_proprio(p0)[:, None].expand(-1, 4, -1)], -1)]  # (B, P, 19)
    for h in range(5):
        ctx = list(range(max(0, h - 2), h + 1))  # the last <= 3 frames
        x = torch.stack([torch.cat([frames[k], cond[:, k, None].expand(-1, 4, -1)], -1) for k in ctx], 1)
        frames.append(m.predictor(x)[:, -1, :, :19])
    want = torch.stack(frames[1:], 1)  # (B, H, P, 19)
    assert torch.allclose(zs, want[..., :16], atol=1e-5) and torch.allclose(ps, want[:, :, 0, 16:], atol=1e-5)


def test_diagnostics_and_perplexity():
    m = WorldModel(tiny("baseline"))
    z, a, p = batch(B=8)
    a[:, :, 0] = torch.arange(8.0)[:, None]  # the action names its sample; the encoder copies it to cond[..., 0]
    with torch.no_grad():
        m.action_encoder.weight.zero_(), m.action_encoder.bias.zero_()
        m.action_encoder.weight[0, 0] = 1.0
    # shortcut: the prediction is dictated by the conditioning (it is the target of the sample the cond came from)
    m.predict = lambda obs, cond: z[cond[:, 0, 0].round().long(), 1:]  # (B, n, P, D)
    g = torch.Generator().manual_seed(0)
    assert wm.swap_score(m, z, a, p, generator=g) > 0.8 and wm.shuffle_delta(m, z, a, p, generator=g) > 0.5
    m.predict = lambda obs, cond: z[:, 1:] + 0.01  # context dictates, the conditioning is ignored
    assert wm.swap_score(m, z, a, p, generator=g) == 0 and abs(wm.shuffle_delta(m, z, a, p, generator=g)) < 1e-6
    assert m.training  # diagnostics restore the mode
    ppl, dead = wm.perplexity(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 6)
    assert abs(ppl - 4) < 1e-5 and dead == 2


def test_train_resume_bit_identical_and_load_run(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    full = train.main(*train_cfgs(root, tmp_path / "full", steps=6))  # vq, dropout 0.1: RNG and EMA matter
    cfg, mc = train_cfgs(root, tmp_path / "part", steps=6)
    calls, forward = [], WorldModel.forward

    def killed(self, *args):
        calls.append(self.training)
        if sum(calls) == 5:  # killed during the 5th train step: the step-3 checkpoint must survive
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(WorldModel, "forward", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg, mc)
    monkeypatch.setattr(WorldModel, "forward", forward)
    assert torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["step"] == 3
    resumed = train.main(cfg, mc)
    for (k, v), w in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    model, ckpt = wm.load_run(tmp_path / "part")
    assert ckpt["step"] == 6 and not model.training and model.quantizer.initialised
    assert set(ckpt["stats"]) >= {"action_mean", "action_std", "proprio_mean", "proprio_std", "latent_mean",
                                  "latent_std"} and len(ckpt["stats"]["latent_mean"]) == 8
    assert json.loads((tmp_path / "part" / "config.json").read_text())["model"]["visual_dim"] == 16
    assert len((tmp_path / "part" / "log.jsonl").read_text().splitlines()) >= 5
    with pytest.raises(FileNotFoundError):
        wm.load_run(tmp_path / "data")
    torch.save({**ckpt, "format": "old"}, tmp_path / "part" / "ckpt.pt")
    with pytest.raises(ValueError, match="format"):
        wm.load_run(tmp_path / "part")


def test_resume_flag_mismatch(tmp_path):
    root = make_dataset(tmp_path / "data")
    cfg, mc = train_cfgs(root, tmp_path / "run", variant="la", steps=2, features=False)
    assert train.main(cfg, mc).cfg.visual_dim == 384  # tokens from the random ViT-S/14 on the fly, not the cache
    with pytest.raises(ValueError, match="--lr-predictor"):
        train.main(replace(cfg, lr_predictor=5e-4), mc)
    with pytest.raises(ValueError, match="--num-codes"):
        train.main(cfg, replace(mc, num_codes=8))
    with pytest.raises(ValueError, match="--steps 1 is below"):
        train.main(replace(cfg, steps=1), mc)
    train.main(replace(cfg, steps=3), mc)  # a raised --steps resumes
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3


def test_nan_guard_keeps_last_checkpoint(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    cfg, mc = train_cfgs(root, tmp_path / "run", variant="baseline", steps=9)
    calls, forward = [], WorldModel.forward

    def poisoned(self, z, action=None, proprio=None):
        out = forward(self, z, action, proprio)
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # the 5th train step (step 4) goes NaN
                out["pred_loss"] = out["pred_loss"] * float("nan")
                out["loss"] = out["pred_loss"]
        return out

    monkeypatch.setattr(WorldModel, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="pred_loss.* at step 4"):
        train.main(cfg, mc)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3  # last good one kept


def _ddp_worker(rank, root, out, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg, mc = train_cfgs(root, out, variant="vq", steps=3)
    model = train.main(cfg, mc)
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_gloo(tmp_path):
    root = make_dataset(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no re-import in the children (spawn costs ~6 s here); safe as the fixture keeps OpenMP at 1 thread
    mp.start_processes(_ddp_worker, args=(str(root), str(tmp_path / "run"), port), nprocs=2, start_method="fork")
    a, b = (torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # replicas identical, codebook included
    assert a["quantizer.initialised"] and torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3
