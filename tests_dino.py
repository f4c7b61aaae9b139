"""Tests for dino.py (CPU, tiny inputs): state-dict contract, forward against a from-spec reference,
positional-embedding interpolation, preprocessing, deterministic random init, offline errors, the feature cache."""
import json
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import dino

OUT_KEYS = {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}


def official_shapes(D=384, depth=12, reg=False, swiglu=False):
    """Key -> shape of the official checkpoints, written out from spec/dinov2.md s4 (not from dino.py)."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1370, D)}
    shapes |= {"register_tokens": (1, 4, D)} if reg else {}
    shapes |= {"mask_token": (1, D), "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,)}
    H = 4096 if swiglu else 4 * D
    ffn = ({"mlp.w12.weight": (2 * H, D), "mlp.w12.bias": (2 * H,), "mlp.w3.weight": (D, H), "mlp.w3.bias": (D,)}
           if swiglu else
           {"mlp.fc1.weight": (H, D), "mlp.fc1.bias": (H,), "mlp.fc2.weight": (D, H), "mlp.fc2.bias": (D,)})
    for i in range(depth):
        block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
                 "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ls1.gamma": (D,),
                 "norm2.weight": (D,), "norm2.bias": (D,), **ffn, "ls2.gamma": (D,)}
        shapes |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return shapes | {"norm.weight": (D,), "norm.bias": (D,)}


def randomize_(model, seed=1):
    """Every parameter random and away from its default (LN weights near 1, gammas in [0.1, 0.2], non-zero biases,
    large tokens), so swapped norms, a q/k mix-up or a missing LayerScale cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            elif name in ("cls_token", "pos_embed", "register_tokens", "mask_token") or name.endswith("bias"):
                p.copy_(0.5 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def reference_forward(sd, x, reg):
    """DINOv2 forward written from spec/dinov2.md s2-s3 with explicit softmax attention."""
    B, _, H, W = x.shape
    h0, w0, D = H // 14, W // 14, sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), 1)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)
    if reg:
        grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37), mode="bicubic")
    t = t + torch.cat((sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)), 1)
    if reg:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]), 1)
    ln = lambda v, k: F.layer_norm(v, (D,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)
    for i in range(12):
        b = lambda k: sd[f"blocks.{i}.{k}"]
        qkv = F.linear(ln(t, f"blocks.{i}.norm1"), b("attn.qkv.weight"), b("attn.qkv.bias"))
        q, k, v = qkv.reshape(B, -1, 3, D // 64, 64).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, D), b("attn.proj.weight"), b("attn.proj.bias"))
        t = t + b("ls1.gamma") * a
        m = F.gelu(F.linear(ln(t, f"blocks.{i}.norm2"), b("mlp.fc1.weight"), b("mlp.fc1.bias")))
        t = t + b("ls2.gamma") * F.linear(m, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
    return t, ln(t, "norm")


@pytest.fixture(scope="module")
def vits():
    return dino.load_dinov2("dinov2_vits14", "random")


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A .pth in the official layout (keys and shapes from the spec table) holding random values."""
    g = torch.Generator().manual_seed(2)
    sd = {k: torch.randn(s, generator=g) for k, s in official_shapes().items()}
    path = tmp_path_factory.mktemp("weights") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return path, sd


def test_state_dict_contract_and_strict_load(official_file, tmp_path):
    for name, D, depth, n_params in [("dinov2_vits14", 384, 12, 22_056_576), ("dinov2_vitb14_reg", 768, 12, 86_583_552),
                                     ("dinov2_vitl14", 1024, 24, None), ("dinov2_vitg14", 1536, 40, None)]:
        with torch.device("meta"):  # shapes only, no memory
            sd = dino.DinoVisionTransformer(name).state_dict()
        want = official_shapes(D, depth, reg=name.endswith("_reg"), swiglu="vitg" in name)
        assert {k: tuple(v.shape) for k, v in sd.items()} == want, name
        assert n_params is None or sum(v.numel() for v in sd.values()) == n_params
    assert len(official_shapes()) == 175 and len(official_shapes(reg=True)) == 176
    path, sd = official_file
    model = dino.load_dinov2("dinov2_vits14", str(path))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"model": {k: v for k, v in sd.items() if k != "blocks.3.ls1.gamma"}}, wrapped)
    with pytest.raises(ValueError, match="(?s)ckpt.pth.*blocks.3.ls1.gamma"):  # unwrapped, then strictly refused
        dino.load_dinov2("dinov2_vits14", str(wrapped))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        dino.load_dinov2("dinov2_vits14", str(tmp_path / "nope.pth"))
    assert dino.weights_tag(str(path)) == f"dinov2_vits14_pretrain.pth:{path.stat().st_size}"


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_forward_equals_reference_from_spec(name):
    with torch.device("meta"):
        model = dino.DinoVisionTransformer(name)
    model = randomize_(model.to_empty(device="cpu")).eval()
    x = torch.randn(2, 3, 28, 42)  # non-square 2 x 3 grid: catches a row/column mix-up
    with torch.no_grad():
        out = model.forward_features(x)
        prenorm, normed = reference_forward(model.state_dict(), x, reg=name.endswith("_reg"))
    R = 4 if name.endswith("_reg") else 0
    assert set(out) == OUT_KEYS and out["masks"] is None
    assert out["x_norm_regtokens"].shape == (2, R, 384) and out["x_prenorm"].shape == (2, 1 + R + 6, 384)
    torch.testing.assert_close(out["x_prenorm"], prenorm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, 1:1 + R], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1 + R:], atol=1e-5, rtol=1e-5)


def test_pos_embed_interpolation(vits):
    pe = vits.pos_embed
    assert vits.interpolate_pos_encoding(37, 37) is pe  # 518 px: the stored table, unchanged
    for (h0, w0), n in {(14, 14): 197, (16, 16): 257, (2, 3): 7, (39, 39): 1 + 39 * 39, (43, 40): 1 + 43 * 40}.items():
        assert vits.interpolate_pos_encoding(h0, w0).shape == (1, n, 384)
    grid = pe[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    offset = F.interpolate(grid, scale_factor=(14.1 / 37, 14.1 / 37), mode="bicubic", align_corners=False)
    sized = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    table = vits.interpolate_pos_encoding(14, 14)
    torch.testing.assert_close(table[:, 1:], offset.flatten(2).transpose(1, 2), atol=0, rtol=0)
    assert torch.equal(table[:, 0], pe[:, 0])
    assert (table[:, 1:] - sized.flatten(2).transpose(1, 2)).abs().max() > 1e-3  # size= would change the features
    assert vits.interpolate_pos_encoding(14, 14) is table  # cached per grid
    reg = dino.load_dinov2("dinov2_vits14_reg", "random")
    grid = reg.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 12), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(reg.interpolate_pos_encoding(16, 12)[:, 1:], want, atol=0, rtol=0)
    new = {k: v + 1 for k, v in reg.state_dict().items()}
    reg.load_state_dict(new)  # loading weights must drop cached tables
    torch.testing.assert_close(reg.interpolate_pos_encoding(16, 12)[:, 1:], want + 1, atol=1e-5, rtol=0)


def test_output_shapes_and_frozen_use(vits):
    x = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        out = vits.forward_features(x)
        cls = vits(x)
    assert {k: tuple(v.shape) for k, v in out.items() if v is not None} == {
        "x_norm_clstoken": (1, 384), "x_norm_regtokens": (1, 0, 384), "x_norm_patchtokens": (1, 256, 384),
        "x_prenorm": (1, 257, 384)}
    assert torch.equal(cls, out["x_norm_clstoken"])
    with pytest.raises(ValueError, match="multiples of 14"):
        vits.forward_features(torch.zeros(1, 3, 30, 28))
    z = dino.encode(vits, torch.zeros(3, 56, 56, 3, dtype=torch.uint8), size=28)
    assert z.shape == (3, 4, 384) and z.dtype == torch.float32
    norm = torch.nn.LayerNorm(384)
    norm(z).sum().backward()  # encode's output can feed a trained module (not an inference tensor)
    assert norm.weight.grad is not None


def test_preprocess_range_and_resize():
    frames = torch.zeros(2, 56, 56, 3, dtype=torch.uint8)
    frames[0] = 255
    frames[1, :, :28] = 255
    x = dino.preprocess(frames, size=28)
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.float32
    assert torch.all(x[0] == 1) and x[1].min() == -1 and x[1].max() == 1  # [-1, 1], mean 0.5 / std 0.5
    full = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
    want = F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(x, want)
    assert not torch.equal(want, F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False))
    torch.testing.assert_close(dino.preprocess(frames, size=56), full)  # already at size: untouched
    with pytest.raises(ValueError, match="uint8"):
        dino.preprocess(full.permute(0, 2, 3, 1), size=28)


def test_random_init_deterministic_and_announced(vits, capsys):
    rng = torch.get_rng_state()
    other = dino.load_dinov2("dinov2_vits14", "random")
    assert "RANDOM" in capsys.readouterr().err
    assert torch.equal(torch.get_rng_state(), rng)  # own generator: the caller's seeding is untouched
    a, b = vits.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["blocks.0.ls1.gamma"], torch.ones(384)) and torch.equal(a["norm.bias"], torch.zeros(384))
    assert 0.015 < a["blocks.0.attn.qkv.weight"].std() < 0.025 and 0.015 < a["pos_embed"].std() < 0.025


def test_offline_error_and_hub_cache(official_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache
    calls = []

    def offline(url, dst, progress=True):
        calls.append((url, dst))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(FileNotFoundError) as err:
        dino.load_dinov2("dinov2_vits14")
    msg = str(err.value)
    for part in ("dinov2_vits14_pretrain.pth", str(cached), "--dino-weights", "random",
                 "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"):
        assert part in msg
    assert calls[0][1] == str(cached)
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_reg4_pretrain.pth"):
        dino.load_dinov2("dinov2_vits14_reg")
    assert calls[1][0] == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    cached.write_bytes(official_file[0].read_bytes())  # as if downloaded: now found without the network
    model = dino.load_dinov2("dinov2_vits14")
    assert len(calls) == 2 and torch.equal(model.cls_token, official_file[1]["cls_token"])
    assert dino.weights_tag(None) == dino.weights_tag(str(official_file[0]))


def test_encode_cache_resumes(tmp_path, vits, monkeypatch):
    root = tmp_path / "data"
    data.collect(root, episodes=2, steps=9, img_size=32)  # 10 train frames, 10 val frames
    monkeypatch.setattr(dino, "load_dinov2", lambda *a, **k: vits)  # same random encoder, loaded once
    stored = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.save(root / "val" / "frames.npy", stored)  # val reads stored frames (as imported datasets), train renders
    cfg = dino.Config(data=str(root), split="train,val", dino_weights="random", size=28, batch_size=4, device="cpu")
    assert dino.load_features(root, "train", size=28, weights="random") is None
    dino.main(cfg)
    val = dino.load_features(root, "val", size=28, weights="random")
    np.testing.assert_allclose(val, dino.encode(vits, stored, 28).numpy(), atol=2e-2, rtol=1e-2)
    feats = dino.load_features(root, "train", size=28, weights="random")
    head = json.loads((root / "train" / "features.json").read_text())
    assert feats.shape == (10, 4, 384) and feats.dtype == np.float16 and head["done"] == head["frames"] == 10
    states = data.load_split(root, "train")["states"]
    want = dino.encode(vits, np.stack([data.render_state(s, 32) for s in states]), 28)
    np.testing.assert_allclose(feats, want.numpy(), atol=2e-2, rtol=1e-2)
    assert dino.load_features(root, "train", size=28, weights="other.pth") is None
    assert dino.load_features(root, "train", size=42, weights="random") is None
    # Interrupted after one chunk: the header says 4 done; only frames 4..9 may be encoded again.
    mm = np.load(root / "train" / "features.npy", mmap_mode="r+")
    mm[:4], mm[4:] = 7, 0
    mm.flush()
    (root / "train" / "features.json").write_text(json.dumps({**head, "done": 4}))
    assert dino.load_features(root, "train", size=28, weights="random") is None  # incomplete
    dino.main(cfg)
    feats = dino.load_features(root, "train", size=28, weights="random")
    assert np.all(feats[:4] == 7)
    np.testing.assert_allclose(feats[4:], want[4:].numpy(), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="--overwrite"):
        dino.main(dino.Config(**{**cfg.__dict__, "size": 42}))
    args = dino.parse_args(["encode", "--data", str(root), "--size", "42", "--overwrite"])
    assert args.size == 42 and args.overwrite and args.command == "encode"
