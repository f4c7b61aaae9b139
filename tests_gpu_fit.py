"""Tests of the precision, fit and self-measurement plumbing (dino.py encode, the --dry-run estimates, plan.py's
auto_batch, reproduce.sh gpu-check). CPU, a few seconds; the GPU-only ones are skipped without CUDA.
    python -m pytest -q tests_gpu_fit.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import dino
import plan
import train
import wm
from data import UserError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).parent
SMALL = dict(depth=1, heads=2, dim_head=16, mlp_dim=64, idm_depth=1, idm_heads=2, idm_dim=32, idm_mlp_dim=64,
             cond_dim=8, latent_dim=8, dino_size=28)  # a tiny world model over 4 DINOv2 patches


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vits():
    return dino.load_dinov2("dinov2_vits14", "random")


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    data.collect(data.CollectConfig(out=str(root), episodes=3, steps=7, img_size=32, workers=1))  # 16 + 8 frames
    return root


def encode_cfg(root, **kw):
    return dino.EncodeConfig(data=str(root), dino_weights="random", size=28, batch_size=4, workers=0, device="cpu",
                             **kw)


def test_encode_runs_in_the_callers_precision(vits):
    """No autocast inside encode: fp32 unless the caller opens one (then its dtype applies to the encoder)."""
    frames = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        ref = vits.forward_features(dino.preprocess(frames, 28))["x_norm_patchtokens"]  # (2, 4, 384) fp32
    z = dino.encode(vits, frames, 28)
    assert z.dtype == torch.float32 and torch.equal(z, ref)  # bit-exact: nothing in between
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = dino.encode(vits, frames, 28)
    assert zb.dtype == torch.float32 and not torch.equal(zb, ref)  # the caller's bf16 reached the encoder
    torch.testing.assert_close(zb, ref, atol=0.1, rtol=0.05)


def test_cache_refused_up_front_when_the_disk_is_small(dataset, monkeypatch, vits):
    monkeypatch.setattr(dino, "load_dinov2", lambda *a, **k: vits)
    monkeypatch.setattr(dino.shutil, "disk_usage", lambda path: type("U", (), {"free": 10_000})())
    with pytest.raises(UserError, match=r"needs 0\.0 GB more disk .* 0\.0 GB are free.*--no-features"):
        dino.main(encode_cfg(dataset))
    assert not list(dataset.glob("*/features.*"))  # nothing written, nothing half-written


def test_damaged_cache_is_never_complete(dataset, monkeypatch, vits):
    monkeypatch.setattr(dino, "load_dinov2", lambda *a, **k: vits)
    dino.main(encode_cfg(dataset))
    npy = dataset / "train" / "features.npy"
    head = json.loads((dataset / "train" / "features.json").read_text())
    assert head["done"] == head["frames"] == 16 and head["dtype"] == "float32" and head["images_per_s"] > 0
    good = np.array(dino.load_features(dataset, "train", size=28, weights="random"))  # (16, 4, 384)
    os.truncate(npy, npy.stat().st_size - 100)
    with pytest.raises(UserError, match=r"features\.npy is damaged.*truncated.*dino\.py encode --data .* --split tr"):
        dino.load_features(dataset, "train", size=28, weights="random")
    dino.main(encode_cfg(dataset))  # encode notices the damage and starts the split again
    np.testing.assert_array_equal(dino.load_features(dataset, "train", size=28, weights="random"), good)
    mm = np.load(npy, mmap_mode="r+")
    mm[-1] = np.nan  # a header that says complete over rows that are not
    mm.flush()
    with pytest.raises(UserError, match="last row is not finite"):
        dino.load_features(dataset, "train", size=28, weights="random")
    with pytest.raises(UserError, match=r"written with dtype 'float32' \(asked: 'bfloat16'\).*--overwrite"):
        dino.cache_plan(encode_cfg(dataset, dtype="bfloat16"), "train", 384, "bfloat16")


def test_peak_memory_counts_what_ops_create():
    """A no-grad chain of 4 linears on 1000 x 1000: two activations of 4 MB are alive at once, parameters excluded."""
    with torch.device("meta"):
        net = torch.nn.Sequential(*[torch.nn.Linear(1000, 1000) for _ in range(4)])
    x = torch.zeros(1000, 1000, device="meta")
    with torch.no_grad():
        flops, peak = dino.measure(lambda: net(x))
    assert flops == 4 * 2 * 1000 ** 3 and peak == 2 * 4 * 1000 ** 2


def test_counted_flops_match_the_layer_formula():
    """FlopCounterMode on the real modules (meta tensors) agrees with train_flops' analytic count."""
    for variant in ("baseline", "la"):
        mc = wm.derive(wm.WMConfig(variant=variant, **SMALL), {"img_size": 32})
        with torch.device("meta"):
            model = wm.WorldModel(mc)
        z, a, p = (torch.zeros(3, 2, *s, device="meta") for s in ((4, 384), (10,), (4,)))
        flops, _ = dino.measure(lambda: model(z, a, p)["loss"].backward())
        assert flops / 3 == pytest.approx(train.train_flops(mc), rel=1e-2)  # small terms aside


def test_dry_runs_plan_a_recipe_without_data(tmp_path, capsys):
    """train.py --dry-run needs no dataset and leaves RUN/config.json; decode.py and plan.py --dry-run plan from it."""
    run, missing = tmp_path / "vq", tmp_path / "not-collected"
    train.main(train.TrainConfig(data=str(missing), out=str(run), batch_size=4, steps=100, eval_every=50,
                                 features=False, dry_run=True), wm.WMConfig(variant="vq", **SMALL))
    assert json.loads((run / "config.json").read_text())["model"]["num_patches"] == 4
    plan.main(plan.PlanConfig(run=str(run), protocol="mpc", num_samples=20, topk=5, opt_steps=3, dry_run=True))
    import decode  # noqa: E402 (after train: the import order of the stages)
    decode.main(decode.DecodeConfig(run=str(run), pairs=100, val_pairs=10, max_epochs=2, dry_run=True))
    dino.main(dino.EncodeConfig(data=str(missing), frames=1000, size=28, dry_run=True))
    out = capsys.readouterr().out
    for stage in ("train-vq", "plan-vq-mpc", "decode-vq", "encode"):
        assert f"estimate {stage}: " in out
    assert "DINOv2: on every batch (--no-features)" in out and "50 episodes x 2 solve(s)" in out
    with pytest.raises(UserError, match="does not exist yet.*--frames"):
        dino.main(dino.EncodeConfig(data=str(missing), dry_run=True))
    with pytest.raises(UserError, match="config.json is missing"):
        plan.main(plan.PlanConfig(run=str(tmp_path / "none"), dry_run=True))


def test_dry_run_refuses_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(dino, "H200_BYTES", 2 ** 20)  # a 1 MiB "GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="train-baseline needs .* GB of GPU memory.*--batch-size"):
        train.main(train.TrainConfig(data=str(tmp_path), out=str(tmp_path / "b"), batch_size=4, features=False,
                                     dry_run=True), wm.WMConfig(**SMALL))


def test_auto_batch_never_plans_more_episodes_than_fit(monkeypatch):
    """--batch-episodes 0 on the CPU: episodes per solve from the counted peak of one episode and the available RAM."""
    mc = wm.derive(wm.WMConfig(variant="la", **SMALL), {"img_size": 32})
    model, cfg = wm.WorldModel(mc).eval(), plan.PlanConfig(run="r", num_samples=300)
    per_episode = plan.episode_memory(mc, cfg)[1]
    monkeypatch.setattr(dino, "available_ram", lambda: 10 * per_episode)
    assert plan.auto_batch(cfg, model, 100, torch.device("cpu")) == 5  # half of the free memory
    assert plan.auto_batch(plan.PlanConfig(run="r", batch_episodes=7), model, 100, torch.device("cpu")) == 7
    monkeypatch.setattr(dino, "available_ram", lambda: per_episode)
    with pytest.raises(UserError, match="one episode's 300 samples need .*--num-samples"):
        plan.auto_batch(cfg, model, 100, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "gpu-check", str(tmp_path / "g")], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "no CUDA device" in r.stdout
    assert not (tmp_path / "g").exists()


@CUDA
def test_gpu_encode_follows_the_precision_of_setup(monkeypatch):
    """data.setup's ctx decides: bf16 autocast by default, fp32 with TF32 off for --dtype float32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)  # restored
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    model = dino.load_dinov2("dinov2_vits14", "random", "cuda")
    frames = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8)
    _, fp32 = data.setup("cuda", 0, "float32")
    with fp32:
        ref = dino.encode(model, frames, 196)
    assert not torch.backends.cuda.matmul.allow_tf32
    _, bf16 = data.setup("cuda", 0, "bfloat16")
    with bf16:
        z = dino.encode(model, frames, 196)
    assert not torch.equal(z, ref) and torch.nn.functional.cosine_similarity(z, ref, dim=-1).min() > 0.99


@CUDA
def test_gpu_auto_batch_fits_the_seed_sizes():
    """auto_batch at 300 samples, horizon 5, 196 tokens: the chosen E runs without running out of memory."""
    mc = wm.derive(wm.WMConfig(variant="vq"), {"img_size": 224})
    model, cfg, device = wm.WorldModel(mc).cuda().eval(), plan.PlanConfig(run="r"), torch.device("cuda")
    E = plan.auto_batch(cfg, model, 100, device)
    z, codes = plan.probe(mc, cfg, E, device)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        plan.rollout_cost(model, z, z, codes)
    assert torch.cuda.max_memory_allocated() < torch.cuda.get_device_properties(0).total_memory
