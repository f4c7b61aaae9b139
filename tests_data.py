"""Tests for data.py: simulator physics and constants, rendering, success test, collect/info, windows and macro
actions, the DINO-WM importer and bad input. CPU, a few seconds: python -m pytest -q tests_data.py --durations=5"""
import json
import math
import pickle

import cv2
import numpy as np
import pytest
import torch

import data
from data import PushT, WindowDataset, collect, env_to_macro, import_dinowm, is_success, macro_to_env, render_state


def _random_run(env, seed, steps):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        env.advance(rng.normal(0, 25, 2))
        out.append(env.get_state())
    return np.stack(out)


def _push_state():
    """Agent 20 px left of the T's cap, at rest; the cap spans x in [196, 316] for the T at (256, 300), angle 0."""
    return np.array([170.0, 315.0, 256.0, 300.0, 0.0, 0.0, 0.0])


def test_physics_is_deterministic_and_history_free():
    a, b = PushT(), PushT()
    a.reset(7), b.reset(7)
    np.testing.assert_array_equal(_random_run(a, 1, 40), _random_run(b, 1, 40))
    s = a.get_state()  # same state after different histories -> same future
    c = PushT()
    c.reset(123), _random_run(c, 5, 10)
    a.set_state(s), c.set_state(s)
    np.testing.assert_array_equal(_random_run(a, 2, 20), _random_run(c, 2, 20))


def test_set_state_round_trip_and_extra_step():
    env = PushT()
    s = np.array([100.0, 120.0, 300.0, 280.0, 1.0, 0.0, 0.0])
    env.set_state(s)
    np.testing.assert_allclose(env.get_state(), s, atol=1e-9)
    env.set_state([100.0, 120.0, 300.0, 280.0, 1.0 + 4 * math.pi, 50.0, -30.0])  # unwrapped angle, moving agent
    got = env.get_state()
    np.testing.assert_allclose(got[:2], [100.5, 119.7], atol=1e-9)  # the extra 0.01 s physics step of set_state
    np.testing.assert_allclose(got[2:], [300.0, 280.0, 1.0, 50.0, -30.0], atol=1e-9)
    env.set_state(s[:5])  # 5 numbers: zero velocity
    np.testing.assert_allclose(env.get_state(), s, atol=1e-9)
    with pytest.raises(ValueError, match="5 or 7"):
        env.set_state([1.0, 2.0, 3.0])


def test_push_moves_block_and_free_step_does_not():
    env = PushT()
    env.set_state(_push_state())
    for _ in range(3):
        env.step([30.0, 0.0])
    moved = env.get_state()
    assert moved[2] - 256.0 > 5  # pushed to the right
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


def test_simulator_constants_and_pd_response():
    env = PushT()
    assert env.block.moment == 3000.0 and env.block.mass == 1
    assert tuple(env.block.center_of_gravity) == (0.0, 45.0)
    assert env.space.damping == 0 and tuple(env.space.gravity) == (0, 0)
    assert all(sh.friction == 0 and sh.elasticity == 0 for sh in env.space.shapes)
    assert env.agent.body_type == env.agent.KINEMATIC
    env.set_state([100.0, 100.0, 400.0, 400.0, 0.0, 0.0, 0.0])
    env.step([20.0, 0.0])  # pusht.md s3: 5.91 px moved, 74.8 px/s left
    s = env.get_state()
    assert abs(s[0] - 100.0 - 5.9134) < 1e-3 and abs(s[5] - 74.8295) < 1e-3 and s[1] == 100.0


def test_reset_distribution_matches_dino_wm():
    env = PushT()
    env.reset(5)
    rs = np.random.RandomState(5)
    want = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)]
    angle = (rs.randn() * 2 * np.pi - np.pi) % (2 * np.pi)
    np.testing.assert_allclose(env.get_state(), want + [angle, 0, 0], atol=1e-6)


def test_is_success_cases():
    g = np.array([100.0, 100.0, 200.0, 200.0, 0.05, 0.0, 0.0])
    assert is_success(g, g)
    assert is_success(g, g + [10, 10, 10, 0, 0, 0, 0])  # |(10, 10, 10, 0)| = 17.3 < 20
    assert not is_success(g, g + [10, 10, 10, 10, 0, 0, 0])  # 20.0, not < 20
    assert not is_success(g, g + [0, 0, 0, 0, math.pi / 9 + 1e-3, 0, 0])
    assert is_success(g, g + [0, 0, 0, 0, 0, 500, 500])  # velocities do not count
    wrap = g.copy()
    wrap[4] = 2 * math.pi - 0.05  # 0.1 rad apart across 0
    assert is_success(g, wrap)
    wrap[4] = 0.05 + 4 * math.pi  # unwrapped angles
    assert is_success(g, wrap)
    wrap[4] = 1.05 + 2 * math.pi  # 1 rad off
    assert not is_success(g, wrap)


def test_render_is_a_function_of_state_and_looks_right():
    env = PushT(img_size=224)
    env.set_state(_push_state())
    frame = env.step([30.0, 0.0])  # in contact: a contact-drawing renderer would differ
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, render_state(env.get_state(), 224))
    big = render_state([100.0, 420.0, 350.0, 350.0, math.pi / 2, 0.0, 0.0], 512)
    assert tuple(big[420, 100]) == data.AGENT_LIGHT and tuple(big[420, 100 + 13]) == data.AGENT_RGB
    assert tuple(big[350, 250]) == data.BLOCK_LIGHT  # y down: angle pi/2 maps local (0, 100) to (-100, 0)
    assert tuple(big[350, 350 - 30]) == data.BLOCK_RGB  # outline of the cap's far edge, local y = 30
    assert tuple(big[267, 245]) == data.GOAL_RGB and tuple(big[5, 200]) == data.WALL_RGB  # anchor T, local (0, 15)
    assert tuple(big[100, 256]) == (255, 255, 255)


@pytest.mark.parametrize("size", [224, 196, 64])
def test_tiled_render_equals_full_resize(size):
    rng = np.random.default_rng(size)
    for _ in range(40):
        s = np.concatenate([rng.uniform(-30, 540, 4), rng.uniform(-7, 7, 1), [0, 0]])
        full = data._static(size)[0].copy()
        data._draw(full, np.rint(data._world(data.T_CORNERS, *s[2:5])).astype(np.int32), (round(s[0]), round(s[1])))
        want = cv2.resize(full, (size, size), interpolation=cv2.INTER_LINEAR)  # upstream's recipe
        np.testing.assert_array_equal(render_state(s, size), want)


def test_collect_info_and_worker_independence(tmp_path, capsys):
    collect(tmp_path / "a", episodes=4, steps=30, img_size=64, seed=3, workers=1, val_fraction=0.25)
    collect(tmp_path / "b", episodes=4, steps=30, img_size=64, seed=3, workers=2, val_fraction=0.25)
    for split in ("train", "val"):
        a, b = data.load_split(tmp_path / "a", split), data.load_split(tmp_path / "b", split)
        for key in ("states", "actions", "lengths"):
            np.testing.assert_array_equal(a[key], b[key])
    tr = data.load_split(tmp_path / "a", "train")
    assert tr["lengths"].tolist() == [31, 31, 31] and tr["states"].shape == (93, 7)
    assert (tr["actions"][30] == 0).all()  # last action of an episode leads nowhere
    meta = data.load_meta(tmp_path / "a")
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
    with pytest.raises(FileExistsError, match="different dataset"):
        collect(tmp_path / "a", episodes=4, steps=30, img_size=64, seed=4, val_fraction=0.25)


def _write_dataset(root, lengths, img_size=32):
    """A hand-made dataset: frame g has agent_x = g and action (g, -g)."""
    f = int(sum(lengths))
    states = np.zeros((f, 7))
    states[:, 0], states[:, 2:4] = np.arange(f), 256.0
    actions = np.stack([np.arange(f), -np.arange(f)], 1).astype(np.float32)
    split = dict(states=states, actions=actions, lengths=np.array(lengths))
    with data._staging(root) as tmp:
        data._write(tmp, dict(train=split, val=split), dict(source="test", img_size=img_size, seed=0, args={}))


@pytest.mark.filterwarnings("ignore:.*shorter than one window")
def test_window_and_macro_action_indexing(tmp_path):
    _write_dataset(tmp_path / "d", [12, 9, 15])
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
    _write_dataset(tmp_path / "short", [5, 9])
    with pytest.raises(ValueError, match="no episode has the 10 frames"):
        WindowDataset(tmp_path / "short", "train")


def test_macro_env_round_trip_numpy_and_torch():
    mean, std = [1.5, -2.0], [20.0, 18.0]
    a_px = np.random.default_rng(0).normal(0, 20, (3, 10, 2))  # (E, H * frameskip, 2)
    macro = env_to_macro(a_px, mean, std)
    assert macro.shape == (3, 2, 10)
    np.testing.assert_allclose(macro[1, 1, 2:4], (a_px[1, 6] - mean) / std)  # step 6 = macro 1, slot 1
    np.testing.assert_allclose(macro_to_env(macro, mean, std), a_px)
    t = torch.tensor(a_px, dtype=torch.float32)
    torch.testing.assert_close(macro_to_env(env_to_macro(t, mean, std), mean, std), t)
    with pytest.raises(ValueError, match="multiple of frameskip"):
        env_to_macro(a_px[:, :7], mean, std)


def _fake_dinowm(root, lengths_by_split, size=64, short_video=None, lengths_obj=None):
    """pusht_noise in DINO-WM's format, made with our simulator: torch.save tensors, a pickle, mp4v videos."""
    for name, lengths in lengths_by_split.items():
        d = root / name
        (d / "obses").mkdir(parents=True)
        n, t_max = len(lengths), max(lengths)
        states, vel, act = torch.zeros(n, t_max, 5), torch.zeros(n, t_max, 2), torch.zeros(n, t_max, 2)
        for i, length in enumerate(lengths):
            s, a = data.collect_episode(100 * len(name) + i, length - 1)
            states[i, :length], vel[i, :length], act[i, :length] = (torch.tensor(s[:, :5]), torch.tensor(s[:, 5:]),
                                                                    torch.tensor(a))
            video = cv2.VideoWriter(str(d / "obses" / f"episode_{i:03d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10,
                                    (size, size))
            for st in s[:length - (short_video == (name, i))]:
                video.write(cv2.cvtColor(render_state(st, size), cv2.COLOR_RGB2BGR))
            video.release()
        for fname, x in (("states", states), ("velocities", vel), ("rel_actions", act), ("abs_actions", act)):
            torch.save(x, d / f"{fname}.pth")
        with open(d / "seq_lengths.pkl", "wb") as f:
            pickle.dump(lengths_obj if lengths_obj is not None else list(lengths), f)


def test_import_dinowm(tmp_path, capsys):
    _fake_dinowm(tmp_path / "src", dict(train=[30, 27, 28], val=[29, 26]))
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
    _fake_dinowm(tmp_path / "short", dict(train=[20, 21], val=[20]), short_video=("train", 1))
    with pytest.raises(ValueError, match=r"episode_001\.mp4: 20 frames, but seq_lengths.pkl says 21"):
        import_dinowm(tmp_path / "short", tmp_path / "out", keep_frames=True)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["short"]  # nothing half-written
    _fake_dinowm(tmp_path / "evil", dict(train=[20], val=[20]), lengths_obj=torch.tensor([20]))
    with pytest.raises(ValueError, match="refusing to load class torch"):
        import_dinowm(tmp_path / "evil", tmp_path / "out")
    _fake_dinowm(tmp_path / "np", dict(train=[20], val=[20]), lengths_obj=[np.int64(20)])
    import_dinowm(tmp_path / "np", tmp_path / "out_np")  # NumPy integers are accepted
    _fake_dinowm(tmp_path / "long", dict(train=[20], val=[20]), lengths_obj=[25])
    with pytest.raises(ValueError, match=r"seq_lengths.pkl: need 1 integers in \[1, 20\]"):
        import_dinowm(tmp_path / "long", tmp_path / "out")
    torch.save(torch.zeros(1, 20, 3), tmp_path / "long" / "train" / "velocities.pth")
    with pytest.raises(ValueError, match=r"velocities.pth: got \(1, 20, 3\)"):
        import_dinowm(tmp_path / "long", tmp_path / "out")
    torch.save(torch.zeros(1, 20, 2), tmp_path / "long" / "train" / "velocities.pth")
    (tmp_path / "long" / "train" / "rel_actions.pth").unlink()
    with pytest.raises(FileNotFoundError, match="rel_actions.pth is missing"):
        import_dinowm(tmp_path / "long", tmp_path / "out")
    (tmp_path / "long" / "train" / "states.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="states.pth is corrupt"):
        import_dinowm(tmp_path / "long", tmp_path / "out")


def test_dataset_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        data.load_meta(tmp_path)
    _write_dataset(tmp_path / "d", [12, 15])
    root = tmp_path / "d"
    np.save(root / "train" / "states.npy", np.zeros((27, 5)))
    with pytest.raises(ValueError, match=r"states.npy: float64 \(27, 5\)"):
        data.load_split(root, "train")
    np.save(root / "train" / "states.npy", np.zeros((26, 7)))
    with pytest.raises(ValueError, match="lengths.npy"):
        data.load_split(root, "train")
    (root / "train" / "actions.npy").write_bytes((root / "train" / "actions.npy").read_bytes()[:100])
    with pytest.raises(ValueError, match="actions.npy is corrupt"):
        data.load_split(root, "train")
    _write_dataset(tmp_path / "e", [12, 15])
    np.save(tmp_path / "e" / "train" / "actions.npy", np.ones((27, 2), np.float32))
    with pytest.raises(ValueError, match="fingerprint"):
        data.info(tmp_path / "e")
    (tmp_path / "e" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        data.load_meta(tmp_path / "e")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a dataset"):
        collect(tmp_path / "junk", episodes=2, steps=5)
    with pytest.raises(ValueError, match="at least 2 episodes"):
        collect(tmp_path / "one", episodes=1, steps=5)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(tmp, splits, meta):
        np.save(tmp / "train" / "states.npy", splits["train"]["states"])
        raise RuntimeError("disk full")
    monkeypatch.setattr(data, "_write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        collect(tmp_path / "out", episodes=2, steps=5)
    assert list(tmp_path.iterdir()) == []


def test_cli_collect_and_info(tmp_path, capsys):
    data.main(["collect", "--out", str(tmp_path / "c"), "--episodes", "3", "--steps", "12", "--img-size", "32"])
    data.main(["info", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "frames/s" in out and "2 episodes, 26 frames" in out and json.loads(
        (tmp_path / "c" / "meta.json").read_text())["splits"]["val"]["frames"] == 13
