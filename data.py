"""Push-T world and its datasets: DINO-WM's simulator (pymunk 7, OpenCV frames), a scripted collector, an importer
for DINO-WM's `pusht_noise`, and the window loader every later stage trains on (spec: shared/spec/pusht.md).

Writes DIR/meta.json (format, source, seed, img_size, env and policy constants, fingerprint, action/proprio mean and
std over real train steps) and DIR/{train,val}/: states.npy float64 (F, 7) [agent_x, agent_y, block_x, block_y,
block_angle, agent_vx, agent_vy], episodes concatenated; actions.npy float32 (F, 2) px, action t applied at state t
(an episode's last one leads nowhere); lengths.npy int64 (E,); optional frames.npy uint8 (F, S, S, 3), else frames
are rendered from states when read. Same arguments on an existing DIR: a no-op; any other existing DIR: an error.
  tiny:   python data.py collect --out runs/tiny/data --episodes 20 --steps 60 && python data.py info runs/tiny/data
  full:   python data.py collect --out data/pusht --episodes 10000 --steps 100 --workers 16  (CPU; 65 MB;
          ~2 min on one core at the ~8,000 frames/s measured for 300 x 100 steps, less with --workers)
  import: python data.py import-dinowm --src pusht_noise --out data/dinowm [--keep-frames]
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pymunk
import torch
from pymunk.vec2d import Vec2d
from tqdm import tqdm

# Shapes: F frames in a split, E episodes, T frames in a window, S image side, A = 2 * frameskip macro-action width.
FORMAT = "pusht-v1"
WORLD = 512  # world = canvas, px, origin top-left, y down (pusht.md s1)
SIM_HZ, CONTROL_HZ = 100, 10  # 10 physics substeps of 0.01 s per env step (DINO-WM pusht_env.py)
DT = 1.0 / SIM_HZ
KP, KV = 100, 20  # PD gains of the pusher (DINO-WM pusht_env.py); critically damped, omega = 10 rad/s
AGENT_RADIUS = 15
T_CAP = np.array([(-60, 30), (60, 30), (60, 0), (-60, 0)], np.float64)  # add_tee with its hard-coded scale 30
T_STEM = np.array([(-15, 30), (-15, 120), (15, 120), (15, 30)], np.float64)
T_CORNERS = np.concatenate([T_CAP, T_STEM])  # (8, 2) drawn as two outlined rectangles
T_OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], np.float64)
WALLS = [((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506))]  # radius 2
GOAL_POSE = (256.0, 256.0, math.pi / 4)  # the green anchor T: drawn only, not the task goal (pusht.md s8)
PROPRIO = [0, 1, 5, 6]  # proprio = [agent_x, agent_y, agent_vx, agent_vy] (DINO-WM pusht_dset.py)
# RGB colours of DINO-WM's pygame renderer; "light" = colour x 1.2 capped at 255, rounded (pusht.md s9).
GOAL_RGB, BLOCK_RGB, BLOCK_LIGHT = (144, 238, 144), (119, 136, 153), (143, 163, 184)
AGENT_RGB, AGENT_LIGHT, WALL_RGB = (65, 105, 225), (78, 126, 255), (211, 211, 211)
ENV = dict(world=WORLD, sim_hz=SIM_HZ, control_hz=CONTROL_HZ, kp=KP, kv=KV, agent_radius=AGENT_RADIUS,
           block_mass=1, block_moment=3000.0, block_cog=[0.0, 45.0], goal_pose=list(GOAL_POSE), pymunk=pymunk.version)
# Scripted contact-seeking pusher (pusht.md s14); our design, judged by `info`'s statistics, stored in meta.json.
POLICY = dict(
    wander_prob=0.15,  # chance that a new plan is a random walk instead of a push
    wander_steps=[3, 10],  # length of a random walk, env steps
    wander_std=20.0,  # px per axis per step of a random walk; DINO-WM's ACTION_STD x 100 is about 20 px
    candidates=2,  # a push starts at the nearest of this many random contacts (shorter walks, consecutive pushes)
    standoff=[20.0, 30.0],  # px from the T's outline to the agent's centre before a push starts
    push_angle=35.0,  # deg; push direction = inward edge normal turned by U(-35, 35) for varied contacts
    push_cmd=[10.0, 30.0],  # px commanded per step while pushing (steady speed = KP/KV/10 x that per step)
    push_steps=[4, 16],  # length of a push, env steps
    approach_cmd=32.0,  # px cap on the per-step command while moving to the stand-off point
    approach_timeout=30,  # env steps before an unreachable stand-off point is given up
    detour_radius=110.0,  # px around the T's CoG to circle along when the straight path would hit it
    noise_std=6.0,  # px per axis of Gaussian noise on every command
    margin=25.0,  # targets are kept in [margin, 512 - margin]^2: the kinematic agent would pass the walls
)


def _world(local, x, y, th):
    """Body-local points (N, 2) -> world (N, 2) for a body origin at (x, y) turned by th (y down: clockwise)."""
    c, s = math.cos(th), math.sin(th)
    return local @ np.array([[c, s], [-s, c]]) + (x, y)  # (N, 2) = R(th) v + p


@functools.lru_cache(maxsize=1)
def _background():
    """The state-independent layer at 512 px: white and the green anchor T (no outline); walls go on top later."""
    canvas = np.full((WORLD, WORLD, 3), 255, np.uint8)  # (512, 512, 3)
    for poly in (T_CAP, T_STEM):
        cv2.fillPoly(canvas, [np.rint(_world(poly, *GOAL_POSE)).astype(np.int32)], GOAL_RGB)
    return canvas


def render_state(state, img_size=224):
    """RGB frame (S, S, 3) uint8 of a state, a pure function of its first 5 numbers (pusht.md s9). As upstream: drawn
    at 512 px in pymunk's debug-draw order (block cap, stem, agent, walls), then cv2.resize(img, (S, S)) (INTER_LINEAR,
    no anti-aliasing). DINO-WM's red contact marks are left out so that a frame depends on the state only. About
    7,000 frames/s at 224 px on one core."""
    canvas = _background().copy()  # (512, 512, 3)
    # World pixels rounded half-to-even, as pygame's to_pygame (Python round) does.
    corners = np.rint(_world(T_CORNERS, state[2], state[3], state[4])).astype(np.int32)  # (8, 2)
    for pts in (corners[:4], corners[4:]):  # each rectangle filled, then outlined: the dark seam is upstream's
        cv2.fillPoly(canvas, [pts], BLOCK_LIGHT)
        cv2.polylines(canvas, [pts], True, BLOCK_RGB, 4)  # pygame's fat segments of radius 2
    centre = (round(state[0]), round(state[1]))
    cv2.circle(canvas, centre, AGENT_RADIUS, AGENT_RGB, -1)
    cv2.circle(canvas, centre, AGENT_RADIUS - 4, AGENT_LIGHT, -1)
    for a, b in WALLS:  # pygame fat segments of radius 2: 4-px lines with round caps
        cv2.line(canvas, a, b, WALL_RGB, 4)
    return canvas if img_size == WORLD else cv2.resize(canvas, (img_size, img_size), interpolation=cv2.INTER_LINEAR)


def is_success(goal_state, state):
    """DINO-WM's eval_state: joint agent+block position error < 20 px and block angle error < pi/9 (pusht.md s8)."""
    g, s = np.asarray(goal_state, np.float64), np.asarray(state, np.float64)
    d = abs(g[4] - s[4]) % (2 * math.pi)  # mod 2 pi first: also right for unwrapped angles
    return bool(np.linalg.norm(g[:4] - s[:4]) < 20 and min(d, 2 * math.pi - d) < math.pi / 9)


class PushT:
    """Push-T with DINO-WM's physics (env/pusht/pusht_env.py, with_velocity=True), quirks included (pusht.md s11).
    State (7,): [agent_x, agent_y, block_x, block_y, block_angle mod 2 pi, agent_vx, agent_vy], px, rad, px/s.
    Action (2,): PD target offset in px relative to the agent (DINO-WM's env action x action_scale 100)."""

    def __init__(self, img_size=224):
        self.img_size = img_size
        self._build()

    def _build(self):
        """A fresh space, built in DINO-WM's _setup() order (walls, agent, block), which fixes contact order."""
        self.space = space = pymunk.Space()
        space.gravity = (0, 0)
        space.damping = 0  # QUIRK (DINO-WM _setup): bodies lose all velocity every substep; the T stops dead
        space.add(*[pymunk.Segment(space.static_body, a, b, 2) for a, b in WALLS])
        # QUIRK: the agent is KINEMATIC (infinite mass): it passes through walls and can push the T through them.
        # All shapes keep pymunk's friction 0 and elasticity 0; DINO-WM's `body.friction = 1` is a no-op.
        self.agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        self.agent.position = (256, 400)
        space.add(self.agent, pymunk.Circle(self.agent, AGENT_RADIUS))
        # QUIRK (add_tee): moment = moment_for_poly(cap) twice = 3000 (the stem term reuses the cap's vertices) ...
        moment = pymunk.moment_for_poly(1, T_CAP.tolist()) + pymunk.moment_for_poly(1, T_CAP.tolist())
        self.block = pymunk.Body(1, moment)
        cap, stem = pymunk.Poly(self.block, T_CAP.tolist()), pymunk.Poly(self.block, T_STEM.tolist())
        # ... and the CoG is the mean of the two centroids, (0, 45), not the area centroid (0, 40.7).
        self.block.center_of_gravity = (cap.center_of_gravity + stem.center_of_gravity) / 2
        self.block.position, self.block.angle = (256, 300), 0
        space.add(self.block, cap, stem)

    def reset(self, seed=None):
        """DINO-WM's reset distribution (pusht.md s7) from a legacy RandomState; returns the first frame."""
        if seed is None:
            seed = np.random.randint(0, 25536)  # DINO-WM seed(): drawn from the global NumPy RNG
        rs = np.random.RandomState(seed)
        # Draw order as upstream; QUIRK: the angle is Gaussian, randn * 2 pi - pi (from Diffusion Policy).
        state = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)]
        return self.set_state(state + [rs.randn() * 2 * np.pi - np.pi, 0, 0])

    def set_state(self, state):
        """Place agent and block (5 or 7 numbers; 5 means zero velocity) and return the frame (pusht.md s6)."""
        s = np.asarray(state, np.float64).reshape(-1)
        if s.shape not in ((5,), (7,)) or not np.isfinite(s).all():
            raise ValueError(f"PushT.set_state wants 5 or 7 finite numbers, got {np.asarray(state).tolist()}")
        s = s.tolist()
        self._build()  # a fresh space also drops cached contact impulses: no dependence on history
        self.agent.velocity = (s[5], s[6]) if len(s) == 7 else (0.0, 0.0)
        self.agent.position = (s[0], s[1])
        self.block.angle = s[4]  # angle first: it rotates about the CoG, then position puts the origin exactly
        self.block.position = (s[2], s[3])
        self.space.step(DT)  # QUIRK (_set_state): one extra physics step; get_state() may differ slightly from s
        return self.render()

    def advance(self, action):
        """step() without the render: one 10 Hz control step of 10 PD-driven physics substeps."""
        target = self.agent.position + (float(action[0]), float(action[1]))  # fixed once per step, never clipped
        for _ in range(SIM_HZ // CONTROL_HZ):  # same float operations, in the same order, as DINO-WM's step()
            acc = KP * (target - self.agent.position) + KV * (Vec2d(0, 0) - self.agent.velocity)
            self.agent.velocity += acc * DT
            self.space.step(DT)

    def step(self, action):
        self.advance(action)
        return self.render()

    def get_state(self):
        a, b = self.agent, self.block
        return np.array([*a.position, *b.position, b.angle % (2 * np.pi), *a.velocity], np.float64)  # (7,)

    def render(self):
        return render_state(self.get_state(), self.img_size)


def _cog(state):
    """World position of the T's centre of gravity, (0, 45) in its body frame."""
    return _world(np.array([[0.0, 45.0]]), state[2], state[3], state[4])[0]


def _plan_push(state, rng):
    """A stand-off point outside a random contact on the T's outline and a push direction into it: the nearest to
    the agent of a few candidates that neither stand outside the arena nor push the T towards a near wall."""
    p, lo, hi = POLICY, POLICY["margin"], WORLD - POLICY["margin"]
    edges = np.roll(T_OUTLINE, -1, axis=0) - T_OUTLINE  # (8, 2)
    lengths = np.linalg.norm(edges, axis=1)
    plans = []
    for _ in range(20):
        i = rng.choice(len(edges), p=lengths / lengths.sum())  # uniform along the outline
        normal = np.array([edges[i][1], -edges[i][0]]) / lengths[i]  # outward for this vertex order
        contact, normal = _world(np.stack([T_OUTLINE[i] + rng.random() * edges[i], normal]), 0, 0, state[4])
        contact = contact + state[2:4]
        direction = _world(-normal[None], 0, 0, math.radians(rng.uniform(-p["push_angle"], p["push_angle"])))[0]
        standoff = contact + normal * rng.uniform(*p["standoff"])
        ahead = _cog(state) + 60 * direction  # where the push heads the T
        if lo <= standoff.min() and standoff.max() <= hi and 70 <= ahead.min() and ahead.max() <= WORLD - 70:
            plans.append((standoff, direction))
        if len(plans) == p["candidates"]:
            break
    return min(plans or [(standoff, direction)], key=lambda plan: np.linalg.norm(plan[0] - state[:2]))


def _waypoint(state, goal, way):
    """The goal if the agent can go straight there without touching the T, else a point on a circle round the T,
    50 deg further in the direction way (+1 or -1)."""
    outline = _world(T_OUTLINE, state[2], state[3], state[4]).astype(np.float32)  # (8, 2)
    path = state[:2] + np.linspace(0.15, 0.9, 8)[:, None] * (goal - state[:2])  # (8, 2)
    if all(cv2.pointPolygonTest(outline, (float(x), float(y)), True) < -AGENT_RADIUS for x, y in path):
        return goal
    u, v = state[:2] - _cog(state)
    phi = math.atan2(v, u) + way * math.radians(50)
    return _cog(state) + POLICY["detour_radius"] * np.array([math.cos(phi), math.sin(phi)])


def collect_episode(seed, steps):
    """One episode of the scripted pusher from reset(seed): states (steps+1, 7) f64, actions (steps+1, 2) f32 px.
    Each plan is a random walk or a push: walk to a stand-off point outside a random contact on the T (round the T
    if needed), then push along a direction into it. Noise on every command; targets stay in the arena."""
    p = POLICY
    env, rng = PushT(), np.random.default_rng(seed)
    env.reset(seed)
    states, actions, mode, left = [env.get_state()], [], None, 0
    for _ in range(steps):
        s = states[-1]
        if left == 0:  # new plan
            if rng.random() < p["wander_prob"]:
                mode, left = "wander", rng.integers(*p["wander_steps"], endpoint=True)
            else:
                (standoff, direction), mode, left = _plan_push(s, rng), "approach", p["approach_timeout"]
                cmd = rng.uniform(*p["push_cmd"])
                (ua, va), (ug, vg) = s[:2] - _cog(s), standoff - _cog(s)
                way = 1 if (math.atan2(vg, ug) - math.atan2(va, ua)) % (2 * math.pi) < math.pi else -1  # short way
        if mode == "wander":
            offset = rng.normal(0, p["wander_std"], 2)
        elif mode == "approach":
            offset = _waypoint(s, standoff, way) - s[:2]
            offset *= min(1.0, p["approach_cmd"] / max(np.linalg.norm(offset), 1e-9))
            if np.linalg.norm(standoff - s[:2]) < 8:  # arrived: push from this step on
                mode, left = "push", rng.integers(*p["push_steps"], endpoint=True)
        if mode == "push":
            offset = cmd * direction
        target = np.clip(s[:2] + offset + rng.normal(0, p["noise_std"], 2), p["margin"], WORLD - p["margin"])
        action = (target - s[:2]).astype(np.float32)  # applied as stored: replaying actions.npy is bit-exact
        env.advance(action)
        states.append(env.get_state())
        actions.append(action)
        left -= 1
    actions.append(np.zeros(2, np.float32))  # the last frame's action leads nowhere
    return np.stack(states), np.stack(actions)  # (steps+1, 7), (steps+1, 2)


def _fingerprint(splits):
    h = hashlib.sha256()
    for a in (splits[name][key] for name in ("train", "val") for key in ("states", "actions", "lengths")):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _existing(out, args):
    """True if out already holds the dataset these args make (then we stop cleanly); error if it holds another."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    try:
        old, args = load_meta(out).get("args", {}), json.loads(json.dumps(args))
    except (FileNotFoundError, ValueError) as e:
        raise FileExistsError(f"{out} exists but is not a dataset ({e}); choose another --out or remove it") from e
    if old != args:
        diff = {k: (old.get(k), v) for k, v in args.items() if old.get(k) != v}
        raise FileExistsError(f"{out} already holds a different dataset (stored vs requested: {diff}); "
                              "choose another --out or delete it")
    print(f"{out} already holds this dataset (same arguments); nothing to do")
    return True


@contextlib.contextmanager
def _staging(out):
    """A temp folder next to out, renamed to out when the block succeeds and deleted when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "train").mkdir(), (tmp / "val").mkdir()
        yield tmp
        if out.exists():
            out.rmdir()  # _existing allowed only an empty folder
        os.rename(tmp, out)  # atomic: a reader sees no dataset or a complete one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(tmp, splits, meta):
    """Arrays and meta.json into the staging folder, with the fingerprint and the train split's statistics: action
    mean/std (px) over real steps (not each episode's last action), proprio mean/std over all frames."""
    splits = {name: dict(states=np.asarray(sp["states"], np.float64), actions=np.asarray(sp["actions"], np.float32),
                         lengths=np.asarray(sp["lengths"], np.int64)) for name, sp in splits.items()}
    for name, split in splits.items():
        for key, array in split.items():
            np.save(tmp / name / f"{key}.npy", array)
    tr = splits["train"]
    a = np.delete(tr["actions"], np.cumsum(tr["lengths"]) - 1, axis=0).astype(np.float64)  # (F - E, 2) real steps
    pr = tr["states"][:, PROPRIO]  # (F, 4)
    safe = lambda sd: np.where(sd > 0, sd, 1.0).tolist()  # a constant column would divide by zero
    meta.update(format=FORMAT, env=ENV, fingerprint=_fingerprint(splits), action_mean=a.mean(0).tolist(),
                action_std=safe(a.std(0)), proprio_mean=pr.mean(0).tolist(), proprio_std=safe(pr.std(0)),
                splits={n: dict(episodes=len(s["lengths"]), frames=int(len(s["states"]))) for n, s in splits.items()})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def load_meta(root):
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a dataset folder (make one with `python data.py collect`)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e}); re-create the dataset") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; re-create the dataset")
    return meta


def load_split(root, split):
    """dict(states (F, 7) f64, actions (F, 2) f32, lengths (E,) i64, starts (E,) i64, frames (F, S, S, 3) or None)."""
    d, out = Path(root) / split, {}
    for key, dtype, shape in (("states", np.float64, (7,)), ("actions", np.float32, (2,)), ("lengths", np.int64, ())):
        try:
            out[key] = a = np.load(d / f"{key}.npy", allow_pickle=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{d / key}.npy is missing; re-create the dataset") from e
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{d / key}.npy is corrupt ({e}); re-create the dataset") from e
        if a.dtype != dtype or a.shape[1:] != shape:
            raise ValueError(f"{d / key}.npy: {a.dtype} {a.shape}, expected {np.dtype(dtype)} (n, {shape})")
    n, lengths = len(out["states"]), out["lengths"]
    if len(lengths) == 0 or lengths.min() < 1 or lengths.sum() != n or len(out["actions"]) != n:
        raise ValueError(f"{d}: lengths.npy (sum {lengths.sum()}) must have positive entries summing to the rows of "
                         f"states.npy ({n}) and actions.npy ({len(out['actions'])})")
    out["starts"] = np.cumsum(lengths) - lengths  # (E,) global index of each episode's first frame
    out["frames"] = np.load(d / "frames.npy", mmap_mode="r") if (d / "frames.npy").is_file() else None
    if out["frames"] is not None and (out["frames"].dtype != np.uint8 or out["frames"].shape[0] != n):
        raise ValueError(f"{d}/frames.npy: {out['frames'].dtype} {out['frames'].shape}, expected uint8 ({n}, S, S, 3)")
    return out


def collect(out, episodes, steps, img_size=224, seed=0, workers=1, val_fraction=0.1):
    """Run the scripted pusher for `episodes` episodes of `steps` env steps (seed + i for episode i) into out."""
    out, n_val = Path(out), max(1, round(episodes * val_fraction))
    if episodes - n_val < 1 or steps < 1:
        raise ValueError(f"collect needs at least 2 episodes and 1 step (got {episodes} episodes, {steps} steps)")
    args = dict(source="collect", episodes=episodes, steps=steps, img_size=img_size, seed=seed,
                val_fraction=val_fraction, policy=POLICY)
    if _existing(out, args):
        return
    job, seeds, t0 = functools.partial(collect_episode, steps=steps), range(seed, seed + episodes), time.time()
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        runs = pool.imap(job, seeds, chunksize=4) if pool else map(job, seeds)
        episodes_out = list(tqdm(runs, total=episodes, desc="collect", unit="ep"))  # any worker count: same arrays
    frames, dt = episodes * (steps + 1), time.time() - t0
    print(f"collected {episodes} episodes, {frames} frames in {dt:.1f} s: {frames / dt:.0f} frames/s with {workers} "
          "worker(s) (states only: frames are rendered when read)")
    cut = episodes - n_val  # val = the last episodes
    splits = {name: dict(states=np.concatenate([e[0] for e in part]), actions=np.concatenate([e[1] for e in part]),
                         lengths=np.full(len(part), steps + 1, np.int64))
              for name, part in (("train", episodes_out[:cut]), ("val", episodes_out[cut:]))}
    with _staging(out) as tmp:
        _write(tmp, splits, dict(source="collect", img_size=img_size, seed=seed, policy=POLICY, args=args))
    print(f"wrote {out}")


class _NoClasses(pickle.Unpickler):
    """For seq_lengths.pkl, a list of ints: refuse every class except NumPy's integer scalars and arrays, whose
    reconstructors only build numbers (a list of np.int64 is a plausible upstream pickle; torch objects are not)."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED | {("numpy", "dtype"), ("numpy", "ndarray")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load class {module}.{name}; save a plain list of ints instead")


def _read(path, shape):
    """A DINO-WM file as float64 (torch tensor, weights_only) or int64 (pickle) array, checked against shape."""
    try:
        if path.suffix == ".pth":
            x = torch.load(path, map_location="cpu", weights_only=True)
            x = x.double().numpy() if torch.is_tensor(x) else x
        else:
            with open(path, "rb") as f:
                x = np.asarray(_NoClasses(f).load())
            x = x.astype(np.int64) if x.dtype.kind in "iu" else x
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} is missing") from e
    except Exception as e:
        raise ValueError(f"{path} is corrupt or not the expected plain data ({e})") from e
    if not isinstance(x, np.ndarray) or x.ndim != len(shape) or any(w and w != v for w, v in zip(shape, x.shape)):
        raise ValueError(f"{path}: got {getattr(x, 'shape', type(x))}, expected {shape} (0 = any)")
    return x


def _decode_mp4(obses, i, length):
    """RGB frames (length, S, S, 3) of obses/episode_{i:03d}.mp4 (or {i:04d}); error if the count differs."""
    path = next((p for p in (obses / f"episode_{i:03d}.mp4", obses / f"episode_{i:04d}.mp4") if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{obses}/episode_{i:03d}.mp4 (or {i:04d}) is missing")
    cap, frames = cv2.VideoCapture(str(path)), []
    while (got := cap.read())[0]:
        frames.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))  # OpenCV decodes BGR; decord (upstream) gives RGB
    cap.release()
    if len(frames) != length:
        raise ValueError(f"{path}: {len(frames)} frames, but seq_lengths.pkl says {length}")
    return np.stack(frames)  # (T, S, S, 3)


def import_dinowm(src, out, keep_frames=False):
    """Convert DINO-WM's pusht_noise into our format (pusht.md s12): real steps only, states7 = states ++ velocities
    (angle as stored), rel_actions in px; frames.npy from the mp4s with keep_frames, else rendered from states."""
    src, out = Path(src), Path(out)
    args = dict(source="dinowm", src=str(src.resolve()), keep_frames=keep_frames)
    if _existing(out, args):
        return
    with _staging(out) as tmp:
        splits, img_size = {}, 224  # DINO-WM's render_size, for frames rendered from states
        for name in ("train", "val"):
            d = src / name
            states = _read(d / "states.pth", (0, 0, 5))  # (N, T_max, 5), zero-padded
            n, t_max, _ = states.shape
            vel, act = _read(d / "velocities.pth", (n, t_max, 2)), _read(d / "rel_actions.pth", (n, t_max, 2))
            lengths = _read(d / "seq_lengths.pkl", (n,))
            if lengths.dtype != np.int64 or lengths.min() < 1 or lengths.max() > t_max:
                raise ValueError(f"{d}/seq_lengths.pkl: need {n} integers in [1, {t_max}]")
            real = np.arange(t_max) < lengths[:, None]  # (N, T_max) drops the padding
            splits[name] = dict(states=np.concatenate([states, vel], -1)[real], actions=act[real], lengths=lengths)
            if keep_frames:
                frames = None
                for i, start in enumerate(tqdm(np.cumsum(lengths) - lengths, desc=f"decode {name}", unit="ep")):
                    ep = _decode_mp4(d / "obses", i, lengths[i])  # (T, S, S, 3)
                    if frames is None:  # the first video fixes the size (train's for both splits)
                        img_size = ep.shape[1] if name == "train" else img_size
                        frames = np.lib.format.open_memmap(tmp / name / "frames.npy", "w+", np.uint8,
                                                           (int(lengths.sum()), img_size, img_size, 3))
                    if ep.shape[1:] != frames.shape[1:]:
                        raise ValueError(f"{d}/obses: episode {i} has {ep.shape[1:]} frames, not {frames.shape[1:]}")
                    frames[start:start + lengths[i]] = ep
                frames.flush()
                del frames  # close the memmap before the folder is renamed
        _write(tmp, splits, dict(source="dinowm", img_size=img_size, seed=None, policy=None, args=args))
    agent, block = replay_drift(load_split(out, "train"))
    print(f"replay check (up to 5 train episodes x 25 steps): mean drift agent {agent:.3f} px, block {block:.3f} px")
    print(f"wrote {out}")


def macro_to_env(a_norm, action_mean, action_std):
    """(..., H, A) z-scored macro actions -> (..., H * A/2, 2) env actions in px, time-major (pusht.md s13)."""
    a = a_norm.reshape(*a_norm.shape[:-2], -1, 2)  # (..., H * frameskip, 2)
    return a * _like(a, action_std) + _like(a, action_mean)


def env_to_macro(a_px, action_mean, action_std, frameskip=5):
    """(..., H * frameskip, 2) env actions in px -> (..., H, 2 * frameskip) z-scored macro actions."""
    if a_px.shape[-2] % frameskip:
        raise ValueError(f"env_to_macro: {a_px.shape[-2]} env actions is not a multiple of frameskip {frameskip}")
    a = (a_px - _like(a_px, action_mean)) / _like(a_px, action_std)
    return a.reshape(*a.shape[:-2], -1, 2 * frameskip)  # (..., H, A)


def _like(x, v):
    """v (mean or std) as an array or tensor matching x's kind, dtype and device."""
    if torch.is_tensor(x):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return np.asarray(v, x.dtype if x.dtype.kind == "f" else np.float64)


class WindowDataset(torch.utils.data.Dataset):
    """Training windows (pusht.md s13): num_frames frames at s, s + frameskip, ..., every start s of every episode.
    item: obs uint8 (T, S, S, 3) rendered from states (or read from frames.npy if it has img_size) unless
    features (F, P, D) are given, then feat float16 (T, P, D); action float32 (T, A), A = 2 * frameskip: row k
    holds the frameskip env actions after frame k, time-major (x0, y0, x1, y1, ...), z-scored with meta's stats
    (the last row leads past the window and is unused); proprio float32 (T, 4) z-scored; state float32 (T, 7);
    index int64 () = global frame index of frame 0."""

    def __init__(self, root, split, num_frames=2, frameskip=5, img_size=None, features=None):
        self.meta, d = load_meta(root), load_split(root, split)
        self.num_frames, self.frameskip = num_frames, frameskip
        self.img_size = img_size or self.meta["img_size"]
        span = frameskip * num_frames  # frames a window's actions cover
        counts = np.maximum(d["lengths"] - span + 1, 0)  # (E,) windows per episode
        if counts.sum() == 0:
            raise ValueError(f"{root}/{split}: no episode has the {span} frames one window needs "
                             f"(longest {d['lengths'].max()}); collect longer episodes or lower num_frames/frameskip")
        if (counts == 0).any():
            warnings.warn(f"{root}/{split}: {(counts == 0).sum()} of {len(counts)} episodes are shorter than one "
                          f"window ({span} frames) and are skipped")
        first = np.cumsum(counts) - counts  # (E,) first window of each episode
        self.window_start = np.repeat(d["starts"] - first, counts) + np.arange(counts.sum())  # (N,) global frame
        mean, std = np.asarray(self.meta["action_mean"]), np.asarray(self.meta["action_std"])
        self.actions = ((d["actions"] - mean) / std).astype(np.float32)  # (F, 2)
        pm, ps = np.asarray(self.meta["proprio_mean"]), np.asarray(self.meta["proprio_std"])
        self.proprio = ((d["states"][:, PROPRIO] - pm) / ps).astype(np.float32)  # (F, 4)
        self.states, self.features = d["states"], features
        self.frames = d["frames"] if d["frames"] is not None and d["frames"].shape[1] == self.img_size else None
        if features is not None and len(features) != len(self.states):
            raise ValueError(f"features have {len(features)} rows, {root}/{split} has {len(self.states)} frames")

    def __len__(self):
        return len(self.window_start)

    def __getitem__(self, i):
        g = int(self.window_start[i])
        idx = g + self.frameskip * np.arange(self.num_frames)  # (T,) global frame indices
        act = self.actions[g:g + self.frameskip * self.num_frames].reshape(self.num_frames, -1)  # (T, A)
        item = dict(action=torch.from_numpy(act.copy()), proprio=torch.from_numpy(self.proprio[idx]),
                    state=torch.from_numpy(self.states[idx].astype(np.float32)), index=torch.tensor(g))
        if self.features is not None:
            item["feat"] = torch.from_numpy(np.asarray(self.features[idx], np.float16))  # (T, P, D)
        elif self.frames is not None:
            item["obs"] = torch.from_numpy(np.ascontiguousarray(self.frames[idx]))  # (T, S, S, 3)
        else:
            item["obs"] = torch.from_numpy(np.stack([render_state(s, self.img_size) for s in self.states[idx]]))
        return item


def block_motion(split, k=5):
    """Largest shift (px) of any T outline vertex over each k-step window (t, t + k) inside an episode: (W,)."""
    states = split["states"]
    t = np.flatnonzero(np.arange(len(states)) + k < np.repeat(split["starts"] + split["lengths"], split["lengths"]))
    c, s = np.cos(states[:, 4:5]), np.sin(states[:, 4:5])  # (F, 1)
    vx = states[:, 2:3] + T_OUTLINE[:, 0] * c - T_OUTLINE[:, 1] * s  # (F, 8) world vertices
    vy = states[:, 3:4] + T_OUTLINE[:, 0] * s + T_OUTLINE[:, 1] * c
    return np.hypot(vx[t + k] - vx[t], vy[t + k] - vy[t]).max(1)  # (W,)


def replay_drift(split, episodes=5, steps=25):
    """Mean position error (agent, block) in px when our simulator replays recorded actions from recorded states
    (pusht.md s12). Expect ~0 for our data and small drift (set_state's extra step, float32), not divergence,
    for data from another simulator."""
    env, err = PushT(), []
    for s0 in split["starts"][split["lengths"] > steps][:episodes]:
        env.set_state(split["states"][s0])
        for t in range(s0, s0 + steps):
            env.advance(split["actions"][t])
            err.append(np.linalg.norm((env.get_state() - split["states"][t + 1])[:4].reshape(2, 2), axis=1))
    return np.mean(err, 0) if err else (float("nan"), float("nan"))


def info(root, bench=500):
    """Print counts, action stats, block motion, coverage and loader speed of a dataset folder."""
    meta, splits = load_meta(root), {name: load_split(root, name) for name in ("train", "val")}
    if _fingerprint(splits) != meta["fingerprint"]:
        raise ValueError(f"{root}: arrays do not match meta.json's fingerprint {meta['fingerprint']} "
                         "(modified or corrupt); re-create the dataset")
    print(f"{root}: source {meta['source']}, img_size {meta['img_size']}, seed {meta.get('seed')}, "
          f"fingerprint {meta['fingerprint']} (verified)")
    for name, sp in splits.items():
        L, shift = sp["lengths"], block_motion(sp)
        print(f"  {name}: {len(L)} episodes, {L.sum()} frames (lengths {L.min()}..{L.max()}); the block moves in "
              f"{np.mean(shift > 1):.1%} of 5-step windows (> 1 px; > 0.01 px: {np.mean(shift > 0.01):.1%})")
    agent, block = replay_drift(splits["train"])
    print(f"  replay drift (train, up to 5 episodes x 25 steps): agent {agent:.3f} px, block {block:.3f} px")
    print(f"  actions (train, real steps, px): mean {np.round(meta['action_mean'], 3).tolist()}, "
          f"std {np.round(meta['action_std'], 3).tolist()}")
    s = splits["train"]["states"]
    cells = len(np.unique(np.clip(s[:, 2:4] // (WORLD / 8), 0, 7), axis=0))
    bins = len(np.unique(s[:, 4] % (2 * np.pi) // (np.pi / 4)))
    print(f"  coverage (train): block xy in {cells / 64:.2f} of 8x8 cells, block angle in {bins / 8:.2f} of 8 bins")
    try:
        ds = WindowDataset(root, "train")
    except ValueError as e:
        return print(f"  loader benchmark skipped: {e}")
    picks, t0 = np.random.default_rng(0).integers(0, len(ds), bench), time.perf_counter()
    for i in picks:
        ds[i]
    print(f"  loader: {len(ds)} train windows; {bench / (time.perf_counter() - t0):.0f} windows/s "
          f"({ds.num_frames} frames at {ds.img_size} px, {'from frames.npy' if ds.frames is not None else 'rendered'})")


def figure(out, seed=5, size=224):
    """A PNG strip of one scripted episode every 5 env steps (one macro action): start ... goal 25 steps later."""
    states, _ = collect_episode(seed, 25)  # (26, 7)
    tiles = []
    for t in range(0, 26, 5):
        tile = cv2.cvtColor(render_state(states[t], size), cv2.COLOR_RGB2BGR)  # (S, S, 3) for cv2.imwrite
        label = "start" if t == 0 else "goal (t = 25)" if t == 25 else f"t = {t}"
        cv2.putText(tile, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.pad(tile, ((0, 0), (0, 4), (0, 0)), constant_values=255))  # 4-px white gutter
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")  # cv2 picks the format from the suffix
    cv2.imwrite(str(tmp), np.concatenate(tiles, 1)[:, :-4])
    os.replace(tmp, out)
    print(f"wrote {out}")


def main(argv=None):
    """The CLI: each sub-command calls the function of the same name with its flags as keyword arguments."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="scripted pushing episodes", formatter_class=fmt)
    c.add_argument("--out", required=True, help="dataset folder to create")
    c.add_argument("--episodes", type=int, default=100, help="episodes in train + val")
    c.add_argument("--steps", type=int, default=100, help="env steps per episode (frames = steps + 1)")
    c.add_argument("--img-size", type=int, default=224, help="frame side in px when read; DINO-WM uses 224")
    c.add_argument("--seed", type=int, default=0, help="episode i starts from reset(seed + i)")
    c.add_argument("--workers", type=int, default=1, help="processes; the output does not depend on it")
    c.add_argument("--val-fraction", type=float, default=0.1, help="the last episodes form val (at least 1)")
    m = sub.add_parser("import-dinowm", help="convert DINO-WM's pusht_noise", formatter_class=fmt)
    m.add_argument("--src", required=True, help="pusht_noise folder with train/ and val/")
    m.add_argument("--out", required=True, help="dataset folder to create")
    m.add_argument("--keep-frames", action="store_true", help="decode the mp4s into frames.npy (large)")
    sub.add_parser("info", help="statistics and loader speed of a dataset").add_argument("root", help="dataset folder")
    f = sub.add_parser("figure", help="PNG strip of one scripted episode (the README's picture)", formatter_class=fmt)
    f.add_argument("--out", default="assets/pusht.png", help="PNG path")
    f.add_argument("--seed", type=int, default=5, help="episode seed")
    args = vars(p.parse_args(argv))
    print(args)
    commands = {"collect": collect, "import-dinowm": import_dinowm, "info": info, "figure": figure}
    commands[args.pop("cmd")](**args)


if __name__ == "__main__":
    main()
