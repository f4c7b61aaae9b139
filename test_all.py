"""All tests, in pipeline order: data -> dino -> wm/train -> decode -> plan -> eval, then the GPU-only checks.

Property tests pin the maths and contracts (simulator constants, DINOv2 key contract and interpolation rule, VQ
straight-through/EMA/dead codes, causal masks, resume, planners' optima and update rules, metric known answers).
One tiny pipeline (collect, dino encode, train baseline/la/vq, decode la/vq: each stage's main(cfg) in-process with
a random-init encoder) is built once and shared by the decode, plan (end-to-end RESULTS.json) and eval tests.
CPU, one torch thread, tiny sizes, temp dirs: about 15 s on 2 cores.
    python -m pytest -q test_all.py
GPU-only checks (bf16 vs fp32 encoder, compiled vs eager world model) skip without CUDA.
"""
import copy
import functools
import json
import math
import os
import pickle
import shutil
import socket
import urllib.error
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import data
import decode
import dino
import eval as evaluate  # `eval` would shadow the builtin
import plan
import train
import wm
from data import PushT, WindowDataset, collect, env_to_macro, import_dinowm, is_success, macro_to_env, render_state
from decode import ActionDecoder, DecodeConfig, load_decoder
from wm import WMConfig, WorldModel

CPU = torch.device("cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
# One random ViT-S per (name, weights, device): its init is deterministic, and building it costs ~0.5 s on 2 cores.
cached_dinov2 = functools.lru_cache(dino.load_dinov2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids OpenMP spin-waits when the 2 cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cached_dino(monkeypatch):
    """Stages that load the random encoder (dino.main, train.main, plan.main) share one built instance."""
    for module in (dino, plan):
        monkeypatch.setattr(module, "load_dinov2", cached_dinov2)


def raises(exc, match, fn, *args, **kw):
    """fn(*args, **kw) must raise exc with a message matching the regex match."""
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


# ---- data.py: simulator physics and constants, rendering, success test, collect/info, windows, importer, bad input
PUSH = np.array([170.0, 315.0, 256.0, 300.0, 0.0, 0.0, 0.0])  # agent 20 px left of the cap of the T at (256, 300)


def random_run(env, seed, steps):
    """States after each of `steps` random actions (px offsets ~ N(0, 25)) -> (steps, 7)."""
    rng = np.random.default_rng(seed)
    return np.stack([env.advance(rng.normal(0, 25, 2)) or env.get_state() for _ in range(steps)])


def test_physics_deterministic_history_free_and_reset():
    a, b, c = PushT(), PushT(), PushT()
    a.reset(7), b.reset(7), c.reset(123), random_run(c, 5, 10)
    np.testing.assert_array_equal(random_run(a, 1, 40), random_run(b, 1, 40))
    a.set_state(s := a.get_state()), c.set_state(s)  # same state after different histories -> same future
    np.testing.assert_array_equal(random_run(a, 2, 20), random_run(c, 2, 20))
    a.reset(5)  # DINO-WM's reset distribution
    rs = np.random.RandomState(5)
    want = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)]
    np.testing.assert_allclose(a.get_state(), want + [(rs.randn() * 2 * np.pi - np.pi) % (2 * np.pi), 0, 0], atol=1e-6)


def test_set_state_round_trip_and_extra_step():
    env, s = PushT(), np.array([100.0, 120.0, 300.0, 280.0, 1.0, 0.0, 0.0])
    env.set_state(s)
    np.testing.assert_allclose(env.get_state(), s, atol=1e-9)
    env.set_state([100.0, 120.0, 300.0, 280.0, 1.0 + 4 * math.pi, 50.0, -30.0])  # unwrapped angle, moving agent
    np.testing.assert_allclose(env.get_state()[:2], [100.5, 119.7], atol=1e-9)  # set_state's extra 0.01 s step
    np.testing.assert_allclose(env.get_state()[2:], [300.0, 280.0, 1.0, 50.0, -30.0], atol=1e-9)
    env.set_state(s[:5])  # 5 numbers: zero velocity
    np.testing.assert_allclose(env.get_state(), s, atol=1e-9)
    raises(ValueError, "5 or 7", env.set_state, [1.0, 2.0, 3.0])


def test_constants_pd_response_and_contact():
    env = PushT()
    assert env.block.moment == 3000.0 and env.block.mass == 1 and tuple(env.block.center_of_gravity) == (0.0, 45.0)
    assert env.space.damping == 0 and tuple(env.space.gravity) == (0, 0) and env.agent.body_type == env.agent.KINEMATIC
    assert all(sh.friction == 0 and sh.elasticity == 0 for sh in env.space.shapes)
    env.set_state([100.0, 100.0, 400.0, 400.0, 0.0, 0.0, 0.0])
    env.step([20.0, 0.0])  # pusht.md s3: 5.91 px moved, 74.8 px/s left
    s = env.get_state()
    assert abs(s[0] - 100.0 - 5.9134) < 1e-3 and abs(s[5] - 74.8295) < 1e-3 and s[1] == 100.0
    env.set_state(PUSH)
    for _ in range(3):
        env.step([30.0, 0.0])
    assert env.get_state()[2] - 256.0 > 5  # pushed to the right
    for _ in range(4):
        env.advance([-30.0, 0.0])  # back off: contact ends ...
    backed = env.get_state()
    env.advance([-30.0, 0.0])
    np.testing.assert_array_equal(env.get_state()[2:5], backed[2:5])  # ... and with damping 0 the T stops dead
    env.set_state([60.0, 60.0, 300.0, 300.0, 0.5, 0.0, 0.0])
    before = env.get_state()
    for _ in range(5):
        env.advance([20.0, 0.0])
    np.testing.assert_array_equal(env.get_state()[2:5], before[2:5])  # no contact, damping 0: exactly still


def test_is_success_cases():
    g = np.array([100.0, 100.0, 200.0, 200.0, 0.05, 0.0, 0.0])
    assert is_success(g, g) and is_success(g, g + [10, 10, 10, 0, 0, 0, 0])  # |(10, 10, 10, 0)| = 17.3 < 20
    assert not is_success(g, g + [10, 10, 10, 10, 0, 0, 0])  # 20.0, not < 20
    assert not is_success(g, g + [0, 0, 0, 0, math.pi / 9 + 1e-3, 0, 0])
    assert is_success(g, g + [0, 0, 0, 0, 0, 500, 500])  # velocities do not count
    for angle, ok in ((2 * math.pi - 0.05, True), (0.05 + 4 * math.pi, True), (1.05 + 2 * math.pi, False)):
        assert is_success(g, np.r_[g[:4], angle, g[5:]]) == ok  # 0.1 rad across 0; unwrapped; 1 rad off


def test_render_is_a_function_of_state_and_looks_right():
    env = PushT(img_size=224)
    env.set_state(PUSH)
    frame = env.step([30.0, 0.0])  # in contact: a contact-drawing renderer would differ
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, render_state(env.get_state(), 224))
    big = render_state([100.0, 420.0, 350.0, 350.0, math.pi / 2, 0.0, 0.0], 512)
    assert tuple(big[420, 100]) == data.AGENT_LIGHT and tuple(big[420, 100 + 13]) == data.AGENT_RGB
    assert tuple(big[350, 250]) == data.BLOCK_LIGHT  # y down: angle pi/2 maps local (0, 100) to (-100, 0)
    assert tuple(big[350, 350 - 30]) == data.BLOCK_RGB  # outline of the cap's far edge, local y = 30
    assert tuple(big[267, 245]) == data.GOAL_RGB and tuple(big[5, 200]) == data.WALL_RGB  # anchor T, local (0, 15)
    assert tuple(big[100, 256]) == (255, 255, 255)
    rng = np.random.default_rng(0)
    for size in (224, 196, 64):  # any size = upstream's recipe: draw at 512 px, cv2.resize INTER_LINEAR
        for _ in range(20):  # also partly off the canvas
            s = np.concatenate([rng.uniform(-30, 540, 4), rng.uniform(-7, 7, 1), [0, 0]])
            want = cv2.resize(render_state(s, 512), (size, size), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(render_state(s, size), want)


def test_collect_info_cli_and_worker_independence(tmp_path, capsys):
    for name, workers in (("a", 1), ("b", 2)):
        collect(tmp_path / name, episodes=4, steps=30, img_size=64, seed=3, workers=workers, val_fraction=0.25)
    for split in ("train", "val"):
        a, b = data.load_split(tmp_path / "a", split), data.load_split(tmp_path / "b", split)
        for key in ("states", "actions", "lengths"):
            np.testing.assert_array_equal(a[key], b[key])
    tr, meta = data.load_split(tmp_path / "a", "train"), data.load_meta(tmp_path / "a")
    assert tr["lengths"].tolist() == [31, 31, 31] and tr["states"].shape == (93, 7)
    assert (tr["actions"][30] == 0).all()  # last action of an episode leads nowhere
    real = np.delete(tr["actions"], [30, 61, 92], axis=0).astype(np.float64)
    np.testing.assert_allclose(meta["action_mean"], real.mean(0))
    np.testing.assert_allclose(meta["action_std"], real.std(0))
    assert meta["splits"]["val"]["episodes"] == 1 and meta["img_size"] == 64
    assert meta["fingerprint"] == data.load_meta(tmp_path / "b")["fingerprint"]
    env = PushT()
    env.reset(3)  # episode i starts from reset(seed + i) ...
    np.testing.assert_array_equal(env.get_state(), tr["states"][0])
    assert max(data.replay_drift(tr, episodes=3, steps=25)) < 1e-9  # ... and replays (angle stored mod 2 pi)
    data.info(tmp_path / "a", bench=20)
    out = capsys.readouterr().out
    assert "3 episodes, 93 frames" in out and "5-step windows" in out and "windows/s" in out and "8x8" in out
    collect(tmp_path / "a", episodes=4, steps=30, img_size=64, seed=3, val_fraction=0.25)  # same args: a no-op
    assert "nothing to do" in capsys.readouterr().out
    raises(FileExistsError, "different dataset", collect, tmp_path / "a", episodes=4, steps=30, img_size=64, seed=4,
           val_fraction=0.25)
    data.main(["collect", "--out", str(tmp_path / "c"), "--episodes", "3", "--steps", "12", "--img-size", "32"])
    data.main(["info", str(tmp_path / "c")])  # the CLI
    assert "frames/s" in (out := capsys.readouterr().out) and "2 episodes, 26 frames" in out
    assert data.load_meta(tmp_path / "c")["splits"]["val"]["frames"] == 13


def write_dataset(root, lengths, img_size=32):
    """A hand-made dataset: frame g has agent_x = g and action (g, -g)."""
    f = int(sum(lengths))
    states = np.zeros((f, 7))
    states[:, 0], states[:, 2:4] = np.arange(f), 256.0
    split = dict(states=states, actions=np.stack([np.arange(f), -np.arange(f)], 1).astype(np.float32),
                 lengths=np.array(lengths))
    with data._staging(root) as tmp:
        data._write(tmp, dict(train=split, val=split), dict(source="test", img_size=img_size, seed=0, args={}))


@pytest.mark.filterwarnings("ignore:.*shorter than one window")
def test_window_and_macro_action_indexing(tmp_path):
    write_dataset(tmp_path / "d", [12, 9, 15])
    with pytest.warns(UserWarning, match="1 of 3 episodes are shorter"):
        ds = WindowDataset(tmp_path / "d", "train", num_frames=2, frameskip=5)
    assert len(ds) == 3 + 0 + 6
    meta = ds.meta
    mean, std = np.array(meta["action_mean"]), np.array(meta["action_std"])
    item = ds[4]  # second window of the third episode: starts at frame 12 + 9 + 1 = 22
    assert int(item["index"]) == 22 and item["obs"].shape == (2, 32, 32, 3) and item["obs"].dtype == torch.uint8
    np.testing.assert_array_equal(item["state"][:, 0].numpy(), [22, 27])
    raw = np.stack([np.arange(22, 32), -np.arange(22, 32)], 1)  # (10, 2): actions 22..31, time-major
    want = ((raw - mean) / std).reshape(2, 10)  # row k = actions 22+5k .. 26+5k as (x0, y0, x1, y1, ...)
    np.testing.assert_allclose(item["action"].numpy(), want, rtol=1e-6)
    assert item["action"][0, 2] == pytest.approx((23 - mean[0]) / std[0])
    np.testing.assert_allclose(item["proprio"][:, 0].numpy(), (np.array([22, 27]) - meta["proprio_mean"][0])
                               / meta["proprio_std"][0], rtol=1e-6)
    np.testing.assert_array_equal(item["obs"][0].numpy(), render_state(ds.states[22], 32))
    feats = np.arange(36 * 3 * 4, dtype=np.float16).reshape(36, 3, 4)
    fi = WindowDataset(tmp_path / "d", "train", features=feats)[4]
    assert "obs" not in fi and fi["feat"].dtype == torch.float16
    np.testing.assert_array_equal(fi["feat"].numpy(), feats[[22, 27]])
    write_dataset(tmp_path / "short", [5, 9])
    raises(ValueError, "no episode has the 10 frames", WindowDataset, tmp_path / "short", "train")


def test_macro_env_round_trip_numpy_and_torch():
    mean, std = [1.5, -2.0], [20.0, 18.0]
    a_px = np.random.default_rng(0).normal(0, 20, (3, 10, 2))  # (E, H * frameskip, 2)
    macro = env_to_macro(a_px, mean, std)
    assert macro.shape == (3, 2, 10)
    np.testing.assert_allclose(macro[1, 1, 2:4], (a_px[1, 6] - mean) / std)  # step 6 = macro 1, slot 1
    np.testing.assert_allclose(macro_to_env(macro, mean, std), a_px)
    t = torch.tensor(a_px, dtype=torch.float32)
    torch.testing.assert_close(macro_to_env(env_to_macro(t, mean, std), mean, std), t)
    raises(ValueError, "multiple of frameskip", env_to_macro, a_px[:, :7], mean, std)


def fake_dinowm(root, lengths_by_split, size=64, short_video=None, lengths_obj=None):
    """pusht_noise in DINO-WM's format, made with our simulator: torch.save tensors, a pickle, mp4v videos."""
    for name, lengths in lengths_by_split.items():
        d, n, t_max = root / name, len(lengths), max(lengths)
        (d / "obses").mkdir(parents=True)
        states, vel, act = torch.zeros(n, t_max, 5), torch.zeros(n, t_max, 2), torch.zeros(n, t_max, 2)
        for i, length in enumerate(lengths):
            s, a = data.collect_episode(100 * len(name) + i, length - 1)
            states[i, :length], vel[i, :length], act[i, :length] = map(torch.tensor, (s[:, :5], s[:, 5:], a))
            video = cv2.VideoWriter(str(d / "obses" / f"episode_{i:03d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10,
                                    (size, size))
            for st in s[:length - (short_video == (name, i))]:
                video.write(cv2.cvtColor(render_state(st, size), cv2.COLOR_RGB2BGR))
            video.release()
        for fname, x in (("states", states), ("velocities", vel), ("rel_actions", act), ("abs_actions", act)):
            torch.save(x, d / f"{fname}.pth")
        (d / "seq_lengths.pkl").write_bytes(pickle.dumps(list(lengths) if lengths_obj is None else lengths_obj))


def test_import_dinowm(tmp_path, capsys):
    fake_dinowm(tmp_path / "src", dict(train=[30, 27, 28], val=[29, 26]))
    import_dinowm(tmp_path / "src", tmp_path / "out", keep_frames=True)
    assert "replay check" in capsys.readouterr().out
    meta, tr = data.load_meta(tmp_path / "out"), data.load_split(tmp_path / "out", "train")
    assert meta["source"] == "dinowm" and meta["img_size"] == 64 and tr["lengths"].tolist() == [30, 27, 28]
    want = np.concatenate([data.collect_episode(500 + i, n - 1)[0] for i, n in enumerate([30, 27, 28])])
    np.testing.assert_allclose(tr["states"], want.astype(np.float32), rtol=0, atol=0)
    assert tr["frames"].shape == (85, 64, 64, 3)
    rendered = np.stack([render_state(s, 64) for s in tr["states"][:30]])
    drawn = rendered.min(-1) < 250  # block, agent, goal, walls
    assert np.abs(tr["frames"][:30].astype(int) - rendered)[drawn].mean() < 12  # RGB order kept through the mp4
    agent, block = data.replay_drift(tr, episodes=3, steps=25)
    assert agent < 1e-3 and block < 1e-3  # float32 storage only
    data.info(tmp_path / "out", bench=5)  # fingerprint of the stored (float32) actions
    item = WindowDataset(tmp_path / "out", "val")[0]
    np.testing.assert_array_equal(item["obs"].numpy(), data.load_split(tmp_path / "out", "val")["frames"][[0, 5]])
    import_dinowm(tmp_path / "src", tmp_path / "out2")  # without frames: rendered at DINO-WM's 224
    assert data.load_meta(tmp_path / "out2")["img_size"] == 224
    assert data.load_split(tmp_path / "out2", "val")["frames"] is None


def test_import_bad_input(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    fake_dinowm(src, dict(train=[20, 21], val=[20]), short_video=("train", 1))
    raises(ValueError, r"episode_001\.mp4: 20 frames, but seq_lengths.pkl says 21", import_dinowm, src, out, True)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # nothing half-written
    fake_dinowm(tmp_path / "evil", dict(train=[20], val=[20]), lengths_obj=torch.tensor([20]))
    raises(ValueError, "refusing to load class torch", import_dinowm, tmp_path / "evil", out)
    fake_dinowm(tmp_path / "np", dict(train=[20], val=[20]), lengths_obj=[np.int64(20)])
    import_dinowm(tmp_path / "np", tmp_path / "out_np")  # NumPy integers are accepted
    fake_dinowm(src := tmp_path / "long", dict(train=[20], val=[20]), lengths_obj=[25])
    raises(ValueError, r"seq_lengths.pkl: need 1 integers in \[1, 20\]", import_dinowm, src, out)
    torch.save(torch.zeros(1, 20, 3), src / "train" / "velocities.pth")
    raises(ValueError, r"velocities.pth: got \(1, 20, 3\)", import_dinowm, src, out)
    torch.save(torch.zeros(1, 20, 2), src / "train" / "velocities.pth")
    (src / "train" / "rel_actions.pth").unlink()
    raises(FileNotFoundError, "rel_actions.pth is missing", import_dinowm, src, out)
    (src / "train" / "states.pth").write_bytes(b"garbage")
    raises(ValueError, "states.pth is corrupt", import_dinowm, src, out)


def test_dataset_bad_input_and_failed_write(tmp_path, monkeypatch):
    raises(FileNotFoundError, "meta.json is missing", data.load_meta, tmp_path)
    write_dataset(d := tmp_path / "d", [12, 15])
    np.save(d / "train" / "states.npy", np.zeros((27, 5)))
    raises(ValueError, r"states.npy: float64 \(27, 5\)", data.load_split, d, "train")
    np.save(d / "train" / "states.npy", np.zeros((26, 7)))
    raises(ValueError, "lengths.npy", data.load_split, d, "train")
    (d / "train" / "actions.npy").write_bytes((d / "train" / "actions.npy").read_bytes()[:100])
    raises(ValueError, "actions.npy is corrupt", data.load_split, d, "train")
    write_dataset(e := tmp_path / "e", [12, 15])
    np.save(e / "train" / "actions.npy", np.ones((27, 2), np.float32))
    raises(ValueError, "fingerprint", data.info, e)
    (e / "meta.json").write_text("{not json")
    raises(ValueError, "meta.json is corrupt", data.load_meta, e)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    raises(FileExistsError, "not a dataset", collect, tmp_path / "junk", episodes=2, steps=5)
    raises(ValueError, "at least 2 episodes", collect, tmp_path / "one", episodes=1, steps=5)

    def broken(tmp, splits, meta):  # the disk fills up half-way through writing: nothing may be left behind
        np.save(tmp / "train" / "states.npy", splits["train"]["states"])
        raise RuntimeError("disk full")
    monkeypatch.setattr(data, "_write", broken)
    raises(RuntimeError, "disk full", collect, tmp_path / "out", episodes=2, steps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e", "junk"]


# ---- dino.py: DINOv2 state-dict contract, forward vs a from-spec reference, interpolation, preprocessing, cache
def official_shapes(D=384, depth=12, reg=False, swiglu=False):
    """Key -> shape of the official checkpoints, written out from spec/dinov2.md s4 (not from dino.py)."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1370, D)} | ({"register_tokens": (1, 4, D)} if reg else {})
    shapes |= {"mask_token": (1, D), "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,)}
    H = 4096 if swiglu else 4 * D
    ffn = ({"mlp.w12.weight": (2 * H, D), "mlp.w12.bias": (2 * H,), "mlp.w3.weight": (D, H), "mlp.w3.bias": (D,)}
           if swiglu else
           {"mlp.fc1.weight": (H, D), "mlp.fc1.bias": (H,), "mlp.fc2.weight": (D, H), "mlp.fc2.bias": (D,)})
    block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
             "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ls1.gamma": (D,),
             "norm2.weight": (D,), "norm2.bias": (D,), **ffn, "ls2.gamma": (D,)}
    shapes |= {f"blocks.{i}.{k}": v for i in range(depth) for k, v in block.items()}
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
    """DINOv2 forward written from spec/dinov2.md s2-s3 with explicit softmax attention -> (prenorm, normed)."""
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
    ln = lambda v, k: F.layer_norm(v, (D,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(12):
        b = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        qkv = F.linear(ln(t, f"blocks.{i}.norm1"), b("attn.qkv.weight"), b("attn.qkv.bias"))
        q, k, v = qkv.reshape(B, -1, 3, D // 64, 64).permute(2, 0, 3, 1, 4)
        a = (torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v).transpose(1, 2).reshape(B, -1, D)
        t = t + b("ls1.gamma") * F.linear(a, b("attn.proj.weight"), b("attn.proj.bias"))
        m = F.gelu(F.linear(ln(t, f"blocks.{i}.norm2"), b("mlp.fc1.weight"), b("mlp.fc1.bias")))
        t = t + b("ls2.gamma") * F.linear(m, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
    return t, ln(t, "norm")


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A .pth in the official layout (keys and shapes from the spec table) holding random values."""
    g = torch.Generator().manual_seed(2)
    sd = {k: torch.randn(s, generator=g) for k, s in official_shapes().items()}
    torch.save(sd, path := tmp_path_factory.mktemp("weights") / "dinov2_vits14_pretrain.pth")
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
    torch.save({"model": {k: v for k, v in sd.items() if k != "blocks.3.ls1.gamma"}}, wrapped := tmp_path / "ckpt.pth")
    # a wrapped file is unwrapped, then strictly refused for the missing key
    raises(ValueError, "(?s)ckpt.pth.*blocks.3.ls1.gamma", dino.load_dinov2, "dinov2_vits14", str(wrapped))
    raises(FileNotFoundError, "nope.pth", dino.load_dinov2, "dinov2_vits14", str(tmp_path / "nope.pth"))
    assert dino.weights_tag(str(path)) == f"dinov2_vits14_pretrain.pth:{path.stat().st_size}"


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_forward_equals_reference_from_spec(name):
    with torch.device("meta"):
        model = dino.DinoVisionTransformer(name)
    model, R = randomize_(model.to_empty(device="cpu")).eval(), 4 if name.endswith("_reg") else 0
    x = torch.randn(2, 3, 28, 42)  # non-square 2 x 3 grid: catches a row/column mix-up
    with torch.no_grad():
        out = model.forward_features(x)
        prenorm, normed = reference_forward(model.state_dict(), x, reg=R > 0)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["masks"] is None and out["x_norm_regtokens"].shape == (2, R, 384)
    assert out["x_prenorm"].shape == (2, 1 + R + 6, 384)
    torch.testing.assert_close(out["x_prenorm"], prenorm, atol=1e-4, rtol=1e-4)
    for key, want in (("x_norm_clstoken", normed[:, 0]), ("x_norm_regtokens", normed[:, 1:1 + R]),
                      ("x_norm_patchtokens", normed[:, 1 + R:])):
        torch.testing.assert_close(out[key], want, atol=1e-5, rtol=1e-5)


def test_pos_embed_interpolation():
    vits = cached_dinov2("dinov2_vits14", "random")
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
    reg.load_state_dict({k: v + 1 for k, v in reg.state_dict().items()})  # loading weights must drop cached tables
    torch.testing.assert_close(reg.interpolate_pos_encoding(16, 12)[:, 1:], want + 1, atol=1e-5, rtol=0)


def test_output_shapes_frozen_use_and_preprocess():
    vits, x = cached_dinov2("dinov2_vits14", "random"), torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        out, cls = vits.forward_features(x), vits(x)
    assert {k: tuple(v.shape) for k, v in out.items() if v is not None} == {
        "x_norm_clstoken": (1, 384), "x_norm_regtokens": (1, 0, 384), "x_norm_patchtokens": (1, 256, 384),
        "x_prenorm": (1, 257, 384)}
    assert torch.equal(cls, out["x_norm_clstoken"])
    raises(ValueError, "multiples of 14", vits.forward_features, torch.zeros(1, 3, 30, 28))
    z = dino.encode(vits, torch.zeros(3, 56, 56, 3, dtype=torch.uint8), size=28)
    assert z.shape == (3, 4, 384) and z.dtype == torch.float32
    norm = torch.nn.LayerNorm(384)
    norm(z).sum().backward()  # encode's output can feed a trained module (not an inference tensor)
    assert norm.weight.grad is not None
    frames = torch.zeros(2, 56, 56, 3, dtype=torch.uint8)
    frames[0], frames[1, :, :28] = 255, 255
    x = dino.preprocess(frames, size=28)
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.float32
    assert torch.all(x[0] == 1) and x[1].min() == -1 and x[1].max() == 1  # [-1, 1], mean 0.5 / std 0.5
    full = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
    want = F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(x, want)
    assert not torch.equal(want, F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False))
    torch.testing.assert_close(dino.preprocess(frames, size=56), full)  # already at size: untouched
    raises(ValueError, "uint8", dino.preprocess, full.permute(0, 2, 3, 1), size=28)


def test_random_init_deterministic_and_announced(capsys):
    rng = torch.get_rng_state()
    other = dino.load_dinov2("dinov2_vits14", "random")
    assert "RANDOM" in capsys.readouterr().err
    assert torch.equal(torch.get_rng_state(), rng)  # own generator: the caller's seeding is untouched
    a, b = cached_dinov2("dinov2_vits14", "random").state_dict(), other.state_dict()
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
    for part in ("dinov2_vits14_pretrain.pth", str(cached), "--dino-weights", "random",
                 "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"):
        assert part in str(err.value)
    assert calls[0][1] == str(cached)
    raises(FileNotFoundError, "dinov2_vits14_reg4_pretrain.pth", dino.load_dinov2, "dinov2_vits14_reg")
    assert calls[1][0] == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    cached.write_bytes(official_file[0].read_bytes())  # as if downloaded: now found without the network
    model = dino.load_dinov2("dinov2_vits14")
    assert len(calls) == 2 and torch.equal(model.cls_token, official_file[1]["cls_token"])
    assert dino.weights_tag(None) == dino.weights_tag(str(official_file[0]))


def test_encode_cache_resumes(tmp_path, cached_dino):
    root, vits = tmp_path / "data", cached_dinov2("dinov2_vits14", "random")
    data.collect(root, episodes=2, steps=9, img_size=32)  # 10 train frames, 10 val frames
    stored = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.save(root / "val" / "frames.npy", stored)  # val reads stored frames (as imported datasets), train renders
    cfg = dino.Config(data=str(root), split="train,val", dino_weights="random", size=28, batch_size=4, device="cpu")
    load = functools.partial(dino.load_features, root, "train", size=28, weights="random")
    assert load() is None
    dino.main(cfg)
    val = dino.load_features(root, "val", size=28, weights="random")
    np.testing.assert_allclose(val, dino.encode(vits, stored, 28).numpy(), atol=2e-2, rtol=1e-2)
    feats, head = load(), json.loads((root / "train" / "features.json").read_text())
    assert feats.shape == (10, 4, 384) and feats.dtype == np.float16 and head["done"] == head["frames"] == 10
    want = dino.encode(vits, np.stack([render_state(s, 32) for s in data.load_split(root, "train")["states"]]), 28)
    np.testing.assert_allclose(feats, want.numpy(), atol=2e-2, rtol=1e-2)
    assert load(weights="other.pth") is None and load(size=42) is None
    # Interrupted after one chunk: the header says 4 done; only frames 4..9 may be encoded again.
    mm = np.load(root / "train" / "features.npy", mmap_mode="r+")
    mm[:4], mm[4:] = 7, 0
    mm.flush()
    (root / "train" / "features.json").write_text(json.dumps({**head, "done": 4}))
    assert load() is None  # incomplete
    dino.main(cfg)
    assert np.all(load()[:4] == 7)
    np.testing.assert_allclose(load()[4:], want[4:].numpy(), atol=2e-2, rtol=1e-2)
    raises(ValueError, "--overwrite", dino.main, replace(cfg, size=42))
    args = dino.parse_args(["encode", "--data", str(root), "--size", "42", "--overwrite"])
    assert args.size == 42 and args.overwrite and args.command == "encode"


# ---- wm.py + train.py: shapes, causal masks, VQ straight-through/EMA/dead codes, overfit, rollout = single steps,
#      diagnostics, resume bit-identical, flag mismatch, NaN guard, DDP over gloo
TINY = dict(visual_dim=16, num_patches=4, cond_dim=8, latent_dim=8, proprio_dim=3, depth=2, heads=2, dim_head=8,
            mlp_dim=32, idm_depth=1, idm_heads=2, idm_dim=16, idm_mlp_dim=32, num_codes=4)


def tiny_wm(variant="baseline", **kw):
    return WMConfig(variant=variant, **{**TINY, **kw})


def batch(B=6, T=2, seed=0):
    """Random tokens z (B, T, 4, 16), actions (B, T, 10), proprio (B, T, 4)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 4, 16, generator=g), torch.randn(B, T, 10, generator=g), torch.randn(B, T, 4, generator=g)


@pytest.fixture(scope="module")
def wm_data(tmp_path_factory):
    """A collected 6 x 24-frame dataset at 28 px with a random 16-wide feature cache in dino.py's format."""
    root, rng = tmp_path_factory.mktemp("wm") / "data", np.random.default_rng(0)
    collect(root, episodes=6, steps=23, img_size=28, val_fraction=1 / 3)
    for split in ("train", "val"):
        n = data.load_meta(root)["splits"][split]["frames"]
        np.save(root / split / "features.npy", rng.normal(0, 1, (n, 4, 16)).astype(np.float16))  # (F, P, D)
        head = dino.cache_header(root, "dinov2_vits14", 28, "random")
        (root / split / "features.json").write_text(json.dumps({**head, "frames": n, "done": n}))
    return root


def train_cfgs(root, out, variant="vq", steps=6, **kw):
    cfg = train.TrainConfig(data=str(root), out=str(out), steps=steps, batch_size=4, eval_every=3, val_batches=2,
                            stats_batches=2, log_every=2, num_workers=0, device="cpu", dino_weights="random",
                            dino_size=28, lr_predictor=1e-3, lr_action=1e-3, lr_idm=1e-3, **kw)
    return cfg, tiny_wm(variant)


def test_shapes_every_variant():
    for variant in ("baseline", "la", "vq"):
        for n, proprio in ((1, False), (3, True)):
            m = WorldModel(tiny_wm(variant, num_hist=n, proprio=proprio))
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
            plans = {"baseline": a[:, :1].expand(-1, 5, -1), "la": torch.randn(6, 5, 8), "vq": torch.randint(4, (6, 5))}
            cond = m.plan_to_cond(plans[variant])
            assert cond.shape == (6, 5, 8)
            zs, ps = m.rollout(z[:, 0], cond, p[:, 0] if proprio else None)
            assert zs.shape == (6, 5, 4, 16) and (ps.shape == (6, 5, 3) if proprio else ps is None)
            assert (m.embed_proprio(p).shape == (6, n + 1, 3)) if proprio else m.embed_proprio(p) is None


def test_frame_causal_mask():
    mask = wm.frame_causal_mask(2, 3)
    assert mask.int().tolist()[1] == [1, 1, 0, 0, 0, 0] and mask[5].all() and not mask[0, 2:].any()
    m = WorldModel(tiny_wm(num_hist=3)).eval()
    x = torch.randn(2, 3, 4, 16 + 8)
    y = x.clone()
    y[:, 2] = torch.randn(2, 4, 24)  # change the last frame only (not by a constant: LayerNorm would remove it)
    a, b = m.predictor(x), m.predictor(y)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6) and not torch.allclose(a[:, 2], b[:, 2])
    m = WorldModel(tiny_wm("la", num_hist=3)).eval()  # the IDM's temporal attention is causal too: u[t] sees <= t
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
    vq.decay, xd = 0.9, x.detach()  # EMA moves the assigned codes toward the mean of their inputs
    gap = lambda: sum(((vq.embedding[k] - xd[codes == k].mean(0)).norm() for k in codes.unique()))  # noqa: E731
    before = gap()
    for _ in range(20):
        _, codes, _ = vq(xd)
    assert gap() < 0.2 * before
    m = WorldModel(tiny_wm("vq"))  # the gradient reaches the IDM through the quantiser
    m(*batch())["loss"].backward()
    assert m.idm.blocks[0].ff[1].weight.grad.abs().sum() > 0 and m.latent_action_down.weight.grad.abs().sum() > 0


def test_dead_code_restart_resets_stats():
    torch.manual_seed(0)
    vq, x = wm.VectorQuantizer(4, 8, ema_decay=0.99, commitment=0.05), torch.randn(32, 8)
    vq(x)
    vq.embedding[3], vq.embedding_avg[3], vq.cluster_size[3] = 1e3, 1e3 * 1e-5, 1e-5  # never selected, s_3 < 1e-3
    vq(x)
    assert (vq.embedding[3] - x).abs().sum(1).min() == 0  # revived as an input of this batch
    assert vq.cluster_size[3] == 1 and torch.equal(vq.embedding_avg[3], vq.embedding[3])
    vq(x + 100)  # everything now far away; code 3 may or may not be picked, but must not jump back to 1e3
    assert vq.embedding[3].abs().max() < 200


@pytest.mark.parametrize("variant", ["baseline", "la", "vq"])
def test_overfit_one_batch(variant):
    torch.manual_seed(0)
    m, (z, a, p) = WorldModel(tiny_wm(variant, dropout=0.0, mlp_dim=64)), batch(B=8)
    opt, first = torch.optim.Adam(m.parameters(), lr=1e-2), None
    for _ in range(80):
        out = m(z, a, p)
        first = first or out["pred_loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["pred_loss"].item() < first / 10, (variant, first, out["pred_loss"].item())


def test_idm_carries_what_the_frame_lacks():
    """Next frame = frame + a per-sample offset that only the frame pair reveals (fresh samples every step, so no
    memorising): the IDM latent must carry it (la well below the action-free error ~1, shuffling it must hurt)."""
    g, held_out = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    def pair(gen, B=64):
        z0 = torch.randn(B, 4, 16, generator=gen)
        return torch.stack([z0, z0 + torch.randn(B, 1, 16, generator=gen)], 1)  # (B, 2, 4, 16)
    a, errors = torch.zeros(64, 2, 10), {}
    for variant in ("baseline", "la"):  # baseline with all-zero actions = no information about the offset
        torch.manual_seed(0)
        m = WorldModel(tiny_wm(variant, cond_dim=16, latent_dim=16, dim_head=16, mlp_dim=64, idm_dim=32, dropout=0.0))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(300):
            loss = m(pair(g), a)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        z = pair(held_out)
        errors[variant] = m.eval()(z, a)["visual_loss"].item()
    assert errors["baseline"] > 0.8 and errors["la"] < 0.6 * errors["baseline"], errors
    assert wm.shuffle_delta(m, z, a) > 1.0  # la's predictor relies on the latent


def test_rollout_equals_single_steps():
    torch.manual_seed(0)
    m = WorldModel(tiny_wm("baseline", num_hist=3, proprio=True)).eval()
    z0, p0, cond = torch.randn(2, 4, 16), torch.randn(2, 4), torch.randn(2, 5, 8)
    zs, ps = m.rollout(z0, cond, p0)
    frames = [torch.cat([z0, m.embed_proprio(p0)[:, None].expand(-1, 4, -1)], -1)]  # (B, P, 19)
    for h in range(5):
        ctx = range(max(0, h - 2), h + 1)  # the last <= 3 frames
        x = torch.stack([torch.cat([frames[k], cond[:, k, None].expand(-1, 4, -1)], -1) for k in ctx], 1)
        frames.append(m.predictor(x)[:, -1, :, :19])
    want = torch.stack(frames[1:], 1)  # (B, H, P, 19)
    assert torch.allclose(zs, want[..., :16], atol=1e-5) and torch.allclose(ps, want[:, :, 0, 16:], atol=1e-5)


def test_diagnostics_and_perplexity_known_answers():
    m, (z, a, p) = WorldModel(tiny_wm("baseline")), batch(B=64)
    a[:, :, 0] = torch.arange(64.0)[:, None]  # the action names its sample; the encoder copies it to cond[..., 0]
    with torch.no_grad():
        m.action_encoder.weight.zero_(), m.action_encoder.bias.zero_()
        m.action_encoder.weight[0, 0] = 1.0
    # shortcut: the prediction is dictated by the conditioning (the target of the sample the cond came from);
    # only fixed points of the permutations fail to win, and shuffling costs the error of a random other frame
    m.predict = lambda obs, cond: z[cond[:, 0, 0].round().long(), 1:]  # (B, n, P, D)
    g = torch.Generator().manual_seed(0)
    assert wm.swap_score(m, z, a, p, generator=g) > 0.95 and wm.shuffle_delta(m, z, a, p, generator=g) > 1.0
    m.predict = lambda obs, cond: z[:, 1:] + 0.01  # context dictates, the conditioning is ignored
    assert wm.swap_score(m, z, a, p, generator=g) == 0 and abs(wm.shuffle_delta(m, z, a, p, generator=g)) < 1e-6
    assert m.training  # diagnostics restore the mode
    assert wm.perplexity(torch.arange(8).repeat(5), 8) == (pytest.approx(8.0), 0)  # uniform usage: PPL = K
    assert wm.perplexity(torch.full((40,), 3), 8) == (pytest.approx(1.0), 7)
    assert wm.perplexity(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 6) == (pytest.approx(4.0, abs=1e-5), 2)


def test_train_resume_bit_identical_and_load_run(wm_data, tmp_path, monkeypatch):
    full = train.main(*train_cfgs(wm_data, tmp_path / "full", steps=6))  # vq, dropout 0.1: RNG and EMA matter
    cfg, mc = train_cfgs(wm_data, tmp_path / "part", steps=6)
    calls, forward = [], WorldModel.forward

    def killed(self, *args):
        calls.append(self.training)
        if sum(calls) == 5:  # killed during the 5th train step: the step-3 checkpoint must survive
            raise KeyboardInterrupt
        return forward(self, *args)
    monkeypatch.setattr(WorldModel, "forward", killed)
    raises(KeyboardInterrupt, None, train.main, cfg, mc)
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
    raises(FileNotFoundError, "train.py", wm.load_run, wm_data)
    torch.save({**ckpt, "format": "old"}, tmp_path / "part" / "ckpt.pt")
    raises(ValueError, "format", wm.load_run, tmp_path / "part")


def test_resume_flag_mismatch(wm_data, tmp_path, cached_dino):
    cfg, mc = train_cfgs(wm_data, tmp_path / "run", variant="la", steps=2, features=False)
    assert train.main(cfg, mc).cfg.visual_dim == 384  # tokens from the random ViT-S/14 on the fly, not the cache
    raises(ValueError, "--lr-predictor", train.main, replace(cfg, lr_predictor=5e-4), mc)
    raises(ValueError, "--num-codes", train.main, cfg, replace(mc, num_codes=8))
    raises(ValueError, "--steps 1 is below", train.main, replace(cfg, steps=1), mc)
    train.main(replace(cfg, steps=3), mc)  # a raised --steps resumes
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3


def test_nan_guard_keeps_last_checkpoint(wm_data, tmp_path, monkeypatch):
    calls, forward = [], WorldModel.forward

    def poisoned(self, z, action=None, proprio=None):
        out = forward(self, z, action, proprio)
        calls.append(self.training)
        if self.training and sum(calls) == 5:  # the 5th train step (step 4) goes NaN
            out["loss"] = out["pred_loss"] = out["pred_loss"] * float("nan")
        return out
    monkeypatch.setattr(WorldModel, "forward", poisoned)
    raises(FloatingPointError, "pred_loss.* at step 4", train.main,
           *train_cfgs(wm_data, tmp_path / "run", variant="baseline", steps=9))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3  # last good one kept


def ddp_worker(rank, root, out, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.save(train.main(*train_cfgs(root, out, variant="vq", steps=3)).state_dict(), Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_gloo(wm_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no re-import in the children (spawn costs ~6 s here); safe as the fixture keeps OpenMP at 1 thread
    mp.start_processes(ddp_worker, args=(str(wm_data), str(tmp_path / "run"), port), nprocs=2, start_method="fork")
    a, b = (torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # replicas identical, codebook included
    assert a["quantizer.initialised"] and torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3


# ---- the shared tiny pipeline: collect -> dino encode -> train baseline/la/vq -> decode la/vq, each main(cfg) once
def tiny_decode(run):
    return DecodeConfig(run=str(run), pairs=64, val_pairs=16, max_epochs=2, code_states=8, workers=0, device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6 x 60-step dataset at 28 px with a random-ViT feature cache, one run per variant trained 2 steps, and
    decoders for la/vq -> (root, {variant: decode.main's report})."""
    root, reports = tmp_path_factory.mktemp("runs"), {}
    with pytest.MonkeyPatch.context() as patch:
        for module in (dino, plan):
            patch.setattr(module, "load_dinov2", cached_dinov2)
        collect(root / "data", episodes=6, steps=60, img_size=28, seed=0)
        dino.main(dino.Config(data=str(root / "data"), dino_weights="random", size=28, device="cpu"))
        for v in ("baseline", "la", "vq"):
            train.main(train.TrainConfig(data=str(root / "data"), out=str(root / v), steps=2, batch_size=4,
                                         eval_every=2, val_batches=1, stats_batches=1, log_every=1, num_workers=0,
                                         device="cpu", dino_weights="random", dino_size=28),
                       tiny_wm(v, visual_dim=384, depth=1))
            reports[v] = decode.main(tiny_decode(root / v))
    return root, reports


# ---- decode.py: decoder shapes, learning a known map, early stopping, the tie to the checkpoint, the code picture
def fit_linear(seed, n_val, sign, cfg):
    """Fit a fresh ActionDecoder on pairs y = z W (val: sign * z W) -> (val RMSE of the kept weights, history, y)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 10, generator=gen)  # (L, A)
    tr, val = ({"p": torch.randn(n, 4, 8, generator=gen).half(), "z": (z := torch.randn(n, 4, generator=gen)),
                "y": s * z @ W} for n, s in ((4 * n_val, 1.0), (n_val, sign)))  # (N, P, D), (N, L), (N, A)
    torch.manual_seed(0)
    dec = ActionDecoder(8, 4, 10)
    hist = decode.fit_decoder(dec, tr, val, cfg, CPU, gen)
    return (decode.predict(dec, val, CPU) - val["y"]).pow(2).mean().sqrt().item(), hist, val["y"]


def test_decoder_shapes_and_branches():
    torch.manual_seed(0)
    p, z = torch.randn(3, 7, 16), torch.randn(3, 4)  # (B, P, D), (B, L)
    plain, delta = ActionDecoder(16, 4, 10), ActionDecoder(16, 4, 10, use_delta=True)
    assert plain(p, z).shape == (3, 10) and delta(p, z, torch.randn(3, 7, 16)).shape == (3, 10)
    # The disabled branch is a learned constant, so the head always sees 128 + 128 + L features (seed).
    assert plain.head[1].in_features == delta.head[1].in_features == 2 * 128 + 4
    assert hasattr(plain, "d_const") and not hasattr(plain, "proj_d") and hasattr(delta, "proj_d")
    same = torch.randn(2, 1, 16).expand(2, 7, 16)  # (B, P, D): attention pooling is a convex combination
    assert torch.allclose(plain.pool(same), same[:, 0], atol=1e-5)


def test_decoder_learns_linear_latent_to_action_map():
    rmse, hist, y = fit_linear(0, 256, 1.0, DecodeConfig(batch_size=64, lr=1e-2, max_epochs=10))
    assert rmse < 0.1 * y.std().item(), hist[-3:]


def test_early_stopping_restores_best_weights():
    # Val targets are the negated train targets, so fitting the train set makes val RMSE worse: stop early.
    cfg = DecodeConfig(batch_size=64, max_epochs=50, patience=3)
    rmse, hist, _ = fit_linear(1, 128, -1.0, cfg)
    best = min(hist, key=lambda h: h["val_rmse"])
    assert len(hist) == best["epoch"] + cfg.patience < cfg.max_epochs
    assert abs(rmse - best["val_rmse"]) < 1e-5 and rmse < hist[-1]["val_rmse"]


def test_code_picture_layout():
    steps = np.zeros((10, 5, 2))  # (K, F, 2)
    steps[3, :, 0] = 10.0  # code 3 pushes right by 50 px in total
    img = decode.draw_codes(steps, np.array([5, 0, 1, 9, 0, 0, 2, 0, 0, 1]), "test", cols=4, cell=100)
    assert img.shape == (60 + 3 * 100, 400, 3) and img.dtype == np.uint8
    cell3 = img[60:160, 300:400]  # code 3: row 0, column 3; its arrow is drawn in colour (B > R)
    assert ((cell3[..., 0].astype(int) - cell3[..., 2]) > 100).sum() > 20


def test_decode_main_report_codes_and_checkpoint_tie(runs):
    root, reports = runs
    report, run = reports["vq"], root / "vq"
    assert report["label_budget"]["train_pairs"] == 64 and len(report["r2_per_dim"]) == 10
    assert json.loads((run / "decode.json").read_text())["val_rmse_px"] == pytest.approx(report["val_rmse_px"])
    assert [c["code"] for c in report["codes"]] == [0, 1, 2, 3] and sum(c["usage"] for c in report["codes"]) == 16
    assert np.array(report["codes"][0]["mean_action_px"]).shape == (5, 2)
    assert (img := cv2.imread(str(run / "codes.png"))) is not None and img.shape[0] > 100
    assert "codes" not in reports["la"] and not (root / "la" / "codes.png").exists()
    ckpt, saved = (torch.load(run / name, weights_only=True) for name in ("ckpt.pt", "decoder.pt"))
    ref = ActionDecoder(**saved["config"]["arch"])
    ref.load_state_dict(saved["model"])
    p, z = torch.randn(2, 4, 384), torch.randn(2, 8)  # (B, P, D), (B, L)
    assert torch.allclose(load_decoder(run, ckpt, CPU)(p, z), ref.eval()(p, z))  # the saved weights, loaded
    raises(ValueError, "retrained", load_decoder, run, {**ckpt, "ckpt_id": "new"}, CPU)  # a retrained world model
    # baseline plans real actions: nothing to decode, nothing written
    assert reports["baseline"] is None and not (root / "baseline" / "decode.json").exists()
    raises(FileNotFoundError, "decode.py", load_decoder, root / "baseline", ckpt, CPU)


def test_decode_bad_inputs(runs, tmp_path):
    raises(FileNotFoundError, "train.py", decode.main, tiny_decode(tmp_path))
    ckpt = torch.load(runs[0] / "vq" / "ckpt.pt", weights_only=True)  # the dataset changed since training
    torch.save({**ckpt, "data": {**ckpt["data"], "fingerprint": "0" * 16}}, tmp_path / "ckpt.pt")
    raises(ValueError, "fingerprint", decode.main, tiny_decode(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # refused, nothing written


# ---- plan.py: planners on known costs and their update rules, batched = separate, rollout_cost, tasks, end to end
def quadratic(target):
    """cost_fn for a quadratic bowl centred on target (E, H, A): samples (E, N, H, A) -> (E, N)."""
    return lambda x: (x - target[:, None]).square().sum((-1, -2))


def table_cost(table):
    """cost_fn for a separable lookup table (E, H, K): samples (E, N, H) -> (E, N) = sum_h table[e, h, idx_h]."""
    return lambda idx: torch.gather(table[:, None].expand(-1, idx.shape[1], -1, -1), 3, idx[..., None])[..., 0].sum(-1)


@pytest.mark.parametrize("planner,sigma,steps,kw,tol", [(plan.cem_gaussian, 3.0, 15, {}, 0.01),
                                                        (plan.mppi, 0.1, 30, dict(temperature=0.01), 0.05)],
                         ids=["cem_gaussian", "mppi"])
def test_gaussian_planners_find_quadratic_minimum(planner, sigma, steps, kw, tol):
    target = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(0)) * 2  # (E, H, A)
    mu = planner(quadratic(target), torch.zeros(3, 3, 2), torch.full((3, 3, 2), sigma), num_samples=100, topk=10,
                 opt_steps=steps, generator=torch.Generator().manual_seed(1), **kw)
    assert (mu - target).abs().max() < tol


def test_cem_gaussian_keeps_mean_as_sample_zero():
    seen, mu0 = [], torch.randn(2, 3, 2)  # (E, H, A)
    plan.cem_gaussian(lambda x: seen.append(x.clone()) or x.square().sum((-1, -2)), mu0, torch.ones(2, 3, 2),
                      num_samples=20, topk=5, opt_steps=2)
    assert torch.equal(seen[0][:, 0], mu0) and not torch.equal(seen[0][:, 1], mu0)


def test_cem_categorical_finds_table_argmin():
    E, H, K = 3, 4, 16  # K^H = 65536 sequences, 10 x 300 samples per episode
    table = torch.rand(E, H, K, generator=torch.Generator().manual_seed(0))  # (E, H, K)
    idx = plan.cem_categorical(table_cost(table), E, H, K, num_samples=300, topk=30, opt_steps=10,
                               generator=torch.Generator().manual_seed(1))
    assert idx.dtype == torch.long and idx.shape == (E, H) and torch.equal(idx, table.argmin(-1))


def test_cem_categorical_update_rule():
    """Pins method.md s9.3: after one iteration whose 30 elites are all code 0 (K = 4), pseudocount 1 gives
    pi_MLE = (31, 1, 1, 1) / 34, momentum 0.7 on the OLD pi gives pi = 0.7/4 + 0.3 pi_MLE, and temperature 1.5
    samples code 0 with probability pi_0^(2/3) / sum pi^(2/3) = 0.3767; the last 10 % of samples stay uniform."""
    seen, N = [], 50_000
    cost = lambda idx: seen.append(idx[0, :, 0]) or (idx[..., 0] != 0).float()  # noqa: E731  code 0 is cheapest
    plan.cem_categorical(cost, 1, 1, 4, num_samples=N, topk=30, opt_steps=2, generator=torch.Generator().manual_seed(0))
    pi = 0.7 / 4 + 0.3 * torch.tensor([31.0, 1, 1, 1]) / 34
    q0 = (pi[0] ** (1 / 1.5) / (pi ** (1 / 1.5)).sum()).item()
    model_part, uniform_part = seen[1][: N - N // 10], seen[1][N - N // 10:]
    assert abs((model_part == 0).float().mean().item() - q0) < 0.01
    assert abs((uniform_part == 0).float().mean().item() - 0.25) < 0.02


def test_cem_categorical_returns_best_ever():
    """The best sample of iteration 1 wins when every later sample costs more (best-ever tracker)."""
    calls = []

    def cost(idx):  # (E, N, H) -> (E, N): random costs in [0, 1) on the first call, [10, 11) afterwards
        c = torch.rand(idx.shape[:2], generator=torch.Generator().manual_seed(len(calls))) + 10 * bool(calls)
        calls.append((idx, c))
        return c
    best = plan.cem_categorical(cost, 2, 3, 8, num_samples=50, topk=5, opt_steps=4,
                                generator=torch.Generator().manual_seed(0))
    idx, c = calls[0]
    assert torch.equal(best, idx[torch.arange(2), c.argmin(1)])


@pytest.mark.parametrize("name", ["cem_gaussian", "mppi", "cem_categorical"])
def test_batched_equals_separate_calls(name):
    """Per-episode generators: planning E episodes in one call equals E calls of one episode each."""
    E, H, A, K = 3, 4, 2, 8
    target = torch.randn(E, H, A, generator=torch.Generator().manual_seed(0))  # (E, H, A)
    table = torch.rand(E, H, K, generator=torch.Generator().manual_seed(0))  # (E, H, K)

    def solve(sl, seeds):
        kw = dict(num_samples=32, topk=4, opt_steps=3, generator=[torch.Generator().manual_seed(s) for s in seeds])
        if name == "cem_categorical":
            return plan.cem_categorical(table_cost(table[sl]), len(seeds), H, K, **kw)
        n = len(seeds)
        return getattr(plan, name)(quadratic(target[sl]), torch.zeros(n, H, A), torch.ones(n, H, A), **kw)
    batched = solve(slice(0, E), [10, 11, 12])
    assert torch.equal(batched, torch.cat([solve(slice(e, e + 1), [10 + e]) for e in range(E)]))
    assert not torch.equal(batched, solve(slice(0, E), [20, 21, 22]))  # the noise matters


@pytest.mark.parametrize("objective", ["last", "all"])
def test_rollout_cost_matches_per_sample_rollouts(objective):
    """One batched call over E*N plans equals rolling each plan out alone (ordering of the flattening), proprio on."""
    torch.manual_seed(0)
    model = WorldModel(WMConfig(visual_dim=8, num_patches=4, cond_dim=4, proprio=True, proprio_dim=3, depth=1,
                                heads=2, dim_head=4, mlp_dim=8)).eval()
    E, N, H = 2, 3, 4
    z0, zg, p0 = torch.randn(E, 4, 8), torch.randn(E, 4, 8), torch.randn(E, 4)  # (E, P, D), (E, P, D), (E, 4)
    pg, plans = torch.randn(E, 3), torch.randn(E, N, H, 10)  # (E, proprio_dim), (E, N, H, A)
    w = 2.0 ** torch.arange(H) / (2.0 ** torch.arange(H)).sum() / H  # DINO-WM objective "all"
    with torch.no_grad():
        cost = plan.rollout_cost(model, z0, zg, plans, p0, pg, alpha=0.5, objective=objective)  # (E, N)
        for e in range(E):
            for n in range(N):
                zs, ps = model.rollout(z0[e:e + 1], model.plan_to_cond(plans[e, n:n + 1]), p0[e:e + 1])
                err = (zs[0] - zg[e]).square().mean((-1, -2)) + 0.5 * (ps[0] - pg[e]).square().mean(-1)  # (H,)
                assert torch.allclose(cost[e, n], err[-1] if objective == "last" else (err * w).sum(), atol=1e-5)


def test_wilson():
    assert plan.wilson(0, 10)[0] == 0 and 0.2 < plan.wilson(0, 10)[1] < 0.35
    lo, hi = plan.wilson(50, 100)
    assert 0.39 < lo < 0.41 and 0.59 < hi < 0.61


@pytest.mark.parametrize("protocol", ["open-loop", "mpc"])
def test_tasks_reproducible_and_replay_reaches_goal(runs, tmp_path, protocol):
    root = runs[0] / "data"
    a, b = (plan.make_tasks(root, "val", protocol, 6, 0, 28) for _ in range(2))
    for key in ("episode", "step", "start_state", "goal_state", "goal_frame"):
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["step"], plan.make_tasks(root, "val", protocol, 6, 1, 28)["step"])
    d = data.load_split(root, "val")
    g = d["starts"][a["episode"]] + a["step"]  # (n,) global start frames
    assert (a["step"] <= d["lengths"][a["episode"]] - 26).all() and np.array_equal(a["start_state"], d["states"][g])
    if protocol == "mpc":  # rows without replacement, goal = the recorded state 25 steps later
        assert len(set(zip(a["episode"], a["step"]))) == 6 and np.array_equal(a["goal_state"], d["states"][g + 25])
    replay = lambda s: a["actions"]  # noqa: E731  (the recorded 25 px actions)
    ok, final, best, clips = plan.run_policy(a, np.arange(6), replay, 25, protocol == "mpc", 28, record=[0])
    assert ok.all() and (best < 20).all()
    frames, hits = clips[0]
    assert len(frames) == len(hits) == 26 and hits[-1] and not hits[0]
    plan.write_video(tmp_path / "ep.mp4", frames, hits, a["goal_frame"][0])
    video = cv2.VideoCapture(str(tmp_path / "ep.mp4"))
    assert video.read()[1].shape == (256, 512, 3) and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 26
    assert not plan.run_policy(a, np.arange(6), lambda s: np.zeros((6, 25, 2)), 25, False, 28)[0].all()


@pytest.mark.parametrize("variant,protocol,extra", [
    ("baseline", "open-loop", {}),
    ("la", "mpc", dict(planner="mppi", la_prior="standard", batch_episodes=2)),
    ("vq", "open-loop", dict(objective="all")),
])
def test_end_to_end_results_json(runs, tmp_path, cached_dino, variant, protocol, extra):
    out = tmp_path / "results" / f"{variant}.json"
    res = plan.main(plan.Config(run=str(runs[0] / variant), out=str(out), episodes=3, protocol=protocol,
                                num_samples=8, topk=2, opt_steps=2, device="cpu", videos=1, **extra))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("success_rate", "successes", "episodes", "protocol", "planner", "seconds_per_solve", "variant",
                "reference", "ci95", "tasks", "config", "mean_final_pos_dist"):
        assert key in saved, key
    assert saved["variant"] == variant and saved["episodes"] == 3 and len(saved["successes"]) == 3
    assert set(saved["successes"]) <= {0, 1} and saved["success_rate"] == sum(saved["successes"]) / 3
    assert saved["planner"] == {"baseline": "cem_gaussian", "la": "mppi", "vq": "cem_categorical"}[variant]
    assert saved["reference"]["replay"] == 1.0 and 0 <= saved["reference"]["random"] <= 1
    assert saved["ci95"][0] <= saved["success_rate"] <= saved["ci95"][1]
    assert saved["seconds_per_solve"] > 0 and len(saved["tasks"]["start_state"]) == 3
    assert (out.parent / f"{variant}_ep000.mp4").stat().st_size > 0
    assert not (out.parent / f"{variant}_ep001.mp4").exists()  # --videos 1


# ---- eval.py: metric known answers, rollout = one-step at h=1, the side-by-side table, METRICS.json, PNG, bad runs
def test_summaries_and_linear_probe_known_answers():
    s = evaluate.summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4 and s["std"] == pytest.approx(1.2910, abs=1e-4)
    assert s["ci95"] == pytest.approx([2.5 - 1.96 * 1.2910 / 2, 2.5 + 1.96 * 1.2910 / 2], abs=1e-4)
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 10, generator=g), torch.randn(10, generator=g)  # (C, A), (A,)
    x_fit, x = torch.randn(400, 6, generator=g), torch.randn(200, 6, generator=g)  # (N, C)
    exact = evaluate.linear_probe(x_fit, x_fit @ W + b, x, x @ W + b, g)
    assert exact["mean"] > 0.999 and exact["n"] == 200 and exact["n_fit"] == 400 and len(exact["per_dim"]) == 10
    noise = evaluate.linear_probe(x_fit, torch.randn(400, 10, generator=g), x, torch.randn(200, 10, generator=g), g)
    assert noise["mean"] < 0.05 and noise["ci95"][0] < noise["mean"] < noise["ci95"][1]


@pytest.mark.parametrize("variant", ["baseline", "la", "vq"])
def test_rollout_step_one_equals_one_step(variant):
    """Horizon 1 of the open-loop rollout is the teacher-forced one-step prediction (same frame, same condition)."""
    torch.manual_seed(0)
    model = WorldModel(tiny_wm(variant, depth=1)).eval()
    z, a = torch.randn(5, 4, 4, 16), torch.randn(5, 4, 10)  # (B, H+1, P, D), (B, H+1, A)
    err = evaluate.rollout_mse(model, z, a)  # (B, H)
    assert err.shape == (5, 3)
    assert torch.allclose(err[:, 0], evaluate.one_step_mse(model, z[:, :2], a[:, :2])[0], atol=1e-5)
    # The error at h depends on the conditioning of steps < h only: changing the last action leaves h=1,2 alone.
    a2, z2 = a.clone(), z.clone()
    a2[:, 2], z2[:, 3] = 5.0, z2[:, 3] + 1.0  # baseline reads actions, la/vq read frames
    assert torch.allclose(evaluate.rollout_mse(model, z2, a2)[:, :2], err[:, :2], atol=1e-5)


def test_parse_config_repeated_runs():
    argv = ["--run", "a", "--run", "b", "c", "--results", "r.json", "--windows", "8"]
    cfg = evaluate.parse_config(evaluate.EvalConfig, argv)
    assert cfg.run == ["a", "b", "c"] and cfg.results == ["r.json"] and cfg.windows == 8
    assert evaluate.parse_config(evaluate.EvalConfig, []).run == []  # the default list is not shared or mutated


def tiny_eval(runs, out, **kw):
    return evaluate.EvalConfig(run=[str(r) for r in runs], out=str(out), windows=12, horizon=2, probe_windows=16,
                               batch_size=8, workers=0, device="cpu", **kw)


def test_table_metrics_and_plot_for_three_runs(runs, tmp_path, capsys):
    root = runs[0]
    result = {"variant": "vq", "protocol": "open-loop", "success_rate": 0.25, "episodes": 4, "successes": [0, 1, 0, 0],
              "reference": {"random": 0.0, "replay": 1.0}, "seconds_per_solve": 0.5, "run": str(root / "vq")}
    (tmp_path / "r.json").write_text(json.dumps(result))
    metrics = evaluate.main(tiny_eval([root / v for v in ("baseline", "la", "vq")], tmp_path / "metrics.json",
                                      results=[str(tmp_path / "r.json")]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert list(saved) == ["baseline", "la", "vq"]
    assert saved["vq"]["perplexity"] == pytest.approx(metrics["vq"]["perplexity"])
    for name in saved:
        assert {"latent_mse", "rollout_mse", "rollout_curve"} <= set(saved[name])
        assert saved[name]["rollout_mse"] == saved[name]["rollout_curve"][-1]["mean"]
        assert saved[name]["latent_mse_stats"]["n"] == 12
    assert {"swap_score", "shuffle_delta", "perplexity", "dead_codes", "probe_r2"} <= set(saved["vq"])
    assert "swap_score" not in saved["baseline"] and 0 <= saved["vq"]["dead_codes"] <= 4
    assert saved["la"]["decoder"]["train_pairs"] == saved["vq"]["decoder"]["train_pairs"] == 64
    out = capsys.readouterr().out
    assert "| metric | baseline | la | vq |" in out and "success rate (open-loop)" in out and "0.25 (n=4" in out
    assert "px (64 pairs)" in out
    img = cv2.imread(str(tmp_path / "metrics_rollout.png"))
    assert img is not None and img.shape == (480, 720, 3)


def test_different_datasets_warned_missing_decoder_and_bad_runs(runs, tmp_path, capsys):
    root = runs[0]  # a copy of the dataset with another fingerprint, and a copy of the vq run pointing at it
    shutil.copytree(root / "data", tmp_path / "data2")
    meta = json.loads((tmp_path / "data2" / "meta.json").read_text())
    (tmp_path / "data2" / "meta.json").write_text(json.dumps({**meta, "fingerprint": "f" * 16}))
    ckpt = torch.load(root / "vq" / "ckpt.pt", weights_only=True)
    (tmp_path / "vq2").mkdir()
    moved = {"root": str(tmp_path / "data2"), "fingerprint": "f" * 16}
    torch.save({**ckpt, "data": moved}, tmp_path / "vq2" / "ckpt.pt")
    cfg = tiny_eval([root / "baseline", tmp_path / "vq2"], tmp_path / "m.json")
    evaluate.main(cfg)
    out = capsys.readouterr().out
    assert "trained on different datasets" in out and "missing: run decode.py" in out  # vq2 has no decoder: said
    torch.save({**ckpt, "format": "old"}, tmp_path / "vq2" / "ckpt.pt")  # an older checkpoint layout
    raises(ValueError, "format", evaluate.main, cfg)


# ---- GPU only (skipped without CUDA): bf16 encoder vs fp32, compiled vs eager world model
@CUDA
def test_gpu_bf16_encode_matches_fp32(monkeypatch):
    """dino.encode's bf16 autocast vs an fp32 reference with TF32 off (spec/dinov2.md s9 tolerances)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding is a convolution
    model = dino.load_dinov2("dinov2_vits14", "random", device="cuda")
    rng = np.random.default_rng(0)
    states = np.concatenate([rng.uniform(100, 400, (8, 4)), rng.uniform(0, 6, (8, 1)), np.zeros((8, 2))], 1)
    frames = torch.as_tensor(np.stack([render_state(s, 224) for s in states]))  # (B, S, S, 3) Push-T frames
    with torch.no_grad():
        ref = model.forward_features(dino.preprocess(frames.cuda(), 196))["x_norm_patchtokens"]  # (B, P, D) fp32
    z = dino.encode(model, frames, 196)  # (B, P, D), bf16 autocast inside
    assert z.dtype == torch.float32 and z.shape == ref.shape == (8, 196, 384)
    assert F.cosine_similarity(z, ref, dim=-1).min() > 0.999  # per token
    assert (z - ref).norm() / ref.norm() < 1e-2


@CUDA
def test_gpu_compiled_world_model_matches_eager(monkeypatch):
    """train.py's Module.compile of predictor and IDM (forward, loss, gradients) and plan.py's
    torch.compile(rollout_cost, dynamic=False) agree with eager fp32 on a tiny vq model with proprio."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    eager = WorldModel(tiny_wm("vq", proprio=True, dropout=0.0)).cuda()
    z, a, p = (t.cuda() for t in batch(B=8))
    eager(z, a, p)  # initialise the codebook first, so both copies start from the same state
    compiled = copy.deepcopy(eager)
    compiled.predictor.compile(), compiled.idm.compile()  # as train.py does; state_dict keys unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    outs = []
    for m in (eager, compiled):
        torch.manual_seed(1)  # dead-code restarts draw from the global RNG
        outs.append(m(z, a, p))
        outs[-1]["loss"].backward()
    assert torch.equal(outs[0]["codes"], outs[1]["codes"])
    for key in ("loss", "pred_loss", "commit_loss"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-4, atol=1e-5)
    for (name, w), w2 in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(w2.grad, w.grad, rtol=1e-3, atol=1e-5, msg=name)
    eager.eval(), compiled.eval()
    E, N, H = 2, 16, 5
    z0, zg = torch.randn(2, E, 4, 16, device="cuda")  # (E, P, D) start and goal tokens
    p0, pg = torch.randn(2, E, 4, device="cuda")  # (E, 4) start and goal proprio
    codes = torch.randint(4, (E, N, H), device="cuda")  # (E, N, H) plans of code indices
    with torch.no_grad():
        pg, cond = eager.embed_proprio(pg), eager.plan_to_cond(codes[:, 0])  # (E, proprio_dim), (E, H, C)
        for want, got in zip(eager.rollout(z0, cond, p0), compiled.rollout(z0, cond, p0)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        want = plan.rollout_cost(eager, z0, zg, codes, p0, pg, 1.0, "all")  # (E, N)
        got = torch.compile(plan.rollout_cost, dynamic=False)(eager, z0, zg, codes, p0, pg, 1.0, "all")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
