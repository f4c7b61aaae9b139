"""Offline world-model metrics for runs side by side, and the success table of every planner and policy on the same
tasks: success says whether planning worked, these metrics say why. Per run, on seeded draws of val windows: one-step
latent MSE, rollout MSE at horizons 1..H from one real frame; la/vq: swap score, shuffle delta, a linear probe latent
action -> true action (fit on train windows), the decoder's error; vq: code usage; jepa: collapse statistics, state
probes, the exploitation gap. Reads RUN/ckpt.pt (+ RUN/decode.json), the run's dataset (--data for moved runs) and
plan.py / policy.py RESULTS.json files. Writes METRICS.json {run name: {metric: value, metric_stats: {mean, std, ci95,
n}, ...}}, <out>_success.json (the success table), a rollout-error PNG, with a label sweep among the results (one
method at several label counts) success against labelled transitions in <out>_labels.png; prints the tables.
GPU:  python eval.py --run runs/full/baseline runs/full/la runs/full/vq --results runs/full/results/*.json
      --out runs/full/metrics.json                                              (H200 wall-clock: not yet measured)
CPU:  python eval.py --run runs/quick/baseline runs/quick/la runs/quick/vq --results runs/quick/results/*.json
      --out runs/quick/metrics.json                                             (state tokens: ~20 s on 2 cores)
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from tqdm import tqdm

import data
import decode
import dino
import plan
import train
import wm
from data import require


@dataclass
class EvalConfig:
    run: list = field(default_factory=list)  # run folders; repeat (--run A --run B) or list (--run A B) to compare
    out: str = "metrics.json"  # METRICS.json path (written atomically); the success table goes next to it
    data: str = ""  # dataset folder for every run, "" = each run's own (for runs moved away from their data)
    results: list = field(default_factory=list)  # plan.py / policy.py RESULTS.json files for the success table
    windows: int = 600  # seeded val windows per metric (R = 600 draws as the seed's evaluator), capped at what exists
    horizon: int = 5  # open-loop rollout horizon in macro steps (the planning horizon)
    probe_windows: int = 5000  # train windows fitting the linear probe latent action -> true action
    gap_tasks: int = 50  # jepa runs: open-loop val tasks planned for the exploitation gap (0 = skip it)
    batch_size: int = 64  # windows per batch; swap score and shuffle delta use the seed's batch of 64
    plot: str = ""  # rollout-error PNG; "" = next to --out as <out stem>_rollout.png
    workers: int = -1  # loader processes rendering frames (pixel tokens without a cache); -1 = one per CPU core
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    seed: int = 0  # seeds window draws and the swap/shuffle permutations
    dino_weights: str = ""  # DINOv2 weights PATH or "random"; "" = each run's own (pixel tokens only)

    def __post_init__(self):
        data.check_choices(self)
        require(self.run or self.results, "nothing to evaluate: pass --run RUN (repeat for side-by-side) and/or "
                                          "--results FILE ...")
        require(self.windows >= 2 and self.horizon >= 1 and self.probe_windows >= 2 and self.batch_size >= 2 and
                self.gap_tasks >= 0, "--windows, --probe-windows and --batch-size must be >= 2, --horizon >= 1, "
                "--gap-tasks >= 0")


# Shapes: B batch, T frames, P tokens per frame, D token width, A macro action, C cond, K codes, H horizon, N windows.
COLOURS = [(200, 80, 30), (40, 140, 40), (30, 30, 200), (150, 60, 150), (0, 140, 200), (90, 90, 90)]  # BGR, per run
# Columns of the success table, in reading order: the floor, the policies, the world models, the ceilings.
COLUMNS = ["random", "gcbc", "iql", "baseline", "la", "la + adapter", "vq", "vq + adapter", "ceiling", "replay"]
REFS = ("random", "ceiling", "replay")  # the reference rows of a success table, measured without labels
GAP_OPT_STEPS = 10  # CEM iterations of the exploitation-gap plans: the budget of the CPU open-loop plan.py commands


def summarize(x):
    """Per-window values (N,) -> mean, std, 95% interval of the mean (normal approximation), n."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()  # (N,)
    m, s = x.mean().item(), (x.std().item() if len(x) > 1 else 0.0)
    h = 1.96 * s / max(len(x), 1) ** 0.5
    return {"mean": m, "std": s, "ci95": [m - h, m + h], "n": len(x)}


def linear_probe(x_fit, y_fit, x, y, generator, boots=200):
    """How much of the true action a linear read-out finds in the latent action (wm.linear_probe fitted on (x_fit,
    y_fit), R^2 on (x, y): 1 = all, 0 = none), with a bootstrap CI; too few fit windows are reported as such."""
    pred = wm.linear_probe(x_fit, y_fit, x)  # (N, A)
    if pred is None:
        return {"too_few": len(y_fit), "need": x_fit.shape[1] + 2}
    y = y.double()
    per_dim = wm.r2(pred, y)  # (A,)
    boot = torch.stack([wm.r2(pred[i], y[i]).mean()
                        for i in torch.randint(len(y), (boots, len(y)), generator=generator)])  # (boots,)
    ci = boot.quantile(torch.tensor([0.025, 0.975], dtype=boot.dtype))  # (2,) percentile interval
    return {"mean": per_dim.mean().item(), "std": boot.std().item(), "ci95": ci.tolist(), "n": len(y),
            "n_fit": len(y_fit), "per_dim": per_dim.tolist()}


def markdown(head, rows):
    """Header cells and rows of cells -> the lines of a markdown table."""
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


@torch.no_grad()
def one_step_mse(model, z, action=None, proprio=None):
    """Teacher-forced next-frame error of the visual dims (the seed's val_visual_latent_pred_loss), z (B, num_hist+1,
    P, D) -> (B,), and the conditioning as in training (baseline: true actions; la: IDM latent; vq: its code)."""
    n, D = model.cfg.num_hist, model.cfg.visual_dim
    c = model.conditioning(z, action)
    pred = model.predict(model.observe(z, proprio)[:, :n], c["cond"][:, :n])[..., :D]  # (B, n, P, D)
    return (pred - z[:, 1:]).pow(2).mean((1, 2, 3)), c  # (B,)


@torch.no_grad()
def rollout_mse(model, z, action=None, proprio=None):
    """Open-loop error per window and horizon from the single real frame z[:, 0] -> (B, H), z (B, H+1, P, D).
    baseline: the true actions; la/vq: the IDM on every consecutive real pair separately, T = 2 as in training
    (the seed inferred them from the whole clip at once, far beyond the T = 2 its IDM was trained on)."""
    B, H = z.shape[0], z.shape[1] - 1
    if model.cfg.variant == "baseline":
        cond = model.conditioning(z, action)["cond"][:, :H]  # (B, H, C)
    else:
        pairs = torch.stack([z[:, :-1], z[:, 1:]], 2).flatten(0, 1)  # (B*H, 2, P, D)
        cond = model.conditioning(pairs)["cond"][:, 0].view(B, H, -1)  # (B, H, C)
    zs, _ = model.rollout(z[:, 0], cond, None if proprio is None else proprio[:, 0])  # (B, H, P, D)
    return (zs - z[:, 1:]).pow(2).mean((2, 3))  # (B, H)


@torch.no_grad()
def evaluate_run(run, cfg, device):
    """All metrics of one run -> dict for METRICS.json."""
    model, ckpt, root = wm.load_run(run, device, cfg.data, cfg.dino_weights)
    mc, H, name, weights = model.cfg, cfg.horizon, Path(run).name, wm.run_dino_weights(ckpt, cfg.dino_weights)
    input_of, gen = dino.make_input(mc, device, weights), torch.Generator().manual_seed(cfg.seed)
    unpack = lambda b: (model.encode(input_of(b)), b["action"].to(device),  # noqa: E731
                        b["proprio"].to(device) if mc.proprio else None)
    out = {"run": str(run), "variant": mc.variant, "tokens": mc.tokens, "dataset": ckpt["data"]["fingerprint"],
           "step": ckpt["step"], "seed": cfg.seed}
    t0 = time.time()

    def batches(split, T, n, desc):  # a seeded draw of min(n, all) windows of T frames (without replacement), batched
        ds = dino.windows(mc, root, split, T, weights)
        idx = np.random.default_rng(cfg.seed).choice(len(ds), min(n, len(ds)), replace=False)
        yield from tqdm(data.loader(ds, cfg.batch_size, idx.tolist(), cfg.workers, device), desc=desc, leave=False,
                        disable=None)

    # One-step latent MSE, plus swap/shuffle and the val side of the probe (la/vq) on the same windows.
    mse, swaps, shuffles, lat, act, codes = [], [], [], [], [], []
    for b in batches("val", mc.num_hist + 1, cfg.windows, f"{name}: one-step"):
        z, a, p = unpack(b)  # (B, n+1, P, D), (B, n+1, A), (B, n+1, 4) | None
        err, c = one_step_mse(model, z, a, p)
        mse.append(err.cpu())  # (B,)
        if mc.variant != "baseline":
            swaps.append(train.swap_score(model, z, a, p, generator=gen))
            shuffles.append(train.shuffle_delta(model, z, a, p, generator=gen))
            lat.append(c["cond"][:, 0].float().cpu()), act.append(a[:, 0].cpu())  # (B, C), (B, A)
        if mc.variant == "vq":
            codes.append(c["codes"][:, 0].cpu())  # (B,) the window's first real transition
    out["latent_mse_stats"] = summarize(torch.cat(mse))
    out["latent_mse"] = out["latent_mse_stats"]["mean"]

    err = torch.cat([rollout_mse(model, *unpack(b)).cpu()
                     for b in batches("val", H + 1, cfg.windows, f"{name}: rollout")])  # (N, H)
    out["rollout_curve"] = [summarize(err[:, h]) for h in range(H)]
    out["rollout_mse"], out["rollout_mse_stats"] = out["rollout_curve"][-1]["mean"], out["rollout_curve"][-1]

    if mc.variant != "baseline":
        out["swap_score_stats"], out["shuffle_delta_stats"] = summarize(swaps), summarize(shuffles)  # n = batches
        out["swap_score"], out["shuffle_delta"] = out["swap_score_stats"]["mean"], out["shuffle_delta_stats"]["mean"]
        # Linear probe latent -> true macro action, fitted on train windows (2 frames: one transition each).
        fit = [(model.conditioning(model.encode(input_of(b)))["cond"][:, 0].float().cpu(), b["action"][:, 0])
               for b in batches("train", 2, cfg.probe_windows, f"{name}: probe fit")]  # (B, C), (B, A)
        out["probe_r2"] = linear_probe(*map(torch.cat, zip(*fit)), torch.cat(lat), torch.cat(act), gen)
        try:  # the action decoder's val accuracy and label budget (RUN/decode.json), or why there is none
            rep = decode.load_head(run, ckpt, "cpu")[1]
            out["decoder"] = {"val_rmse_px": rep["val_rmse_px"], "r2_mean": rep["r2_mean"],
                              "train_pairs": rep["label_budget"]["train_pairs"], "labels": rep["labels"]}
        except data.UserError as e:
            print(f"note: {e}")
            out["decoder"] = {"error": str(e)}
    if mc.variant == "vq":
        codes, K = torch.cat(codes), mc.num_codes
        out["perplexity"], out["dead_codes"] = train.perplexity(codes, K)
        out.update(num_codes=K, code_usage=torch.bincount(codes, minlength=K).tolist())

    # jepa: collapse statistics of val-frame tokens (train.token_stats), linear probes of agent xy, block xy and angle
    # (cos, sin) from one frame's tokens (fit on train frames, scored on val frames), and for baseline runs the
    # exploitation gap on open-loop val tasks: the model's cost of the plan its planner finds (plan.py's Gaussian CEM,
    # 300 samples, top 30, GAP_OPT_STEPS iterations) against its cost of the recorded actions that reach the goal.
    if mc.tokens == "jepa":
        def tokens(split, n):  # one frame per window: tokens (N, 1, D), probe targets (N, 6)
            zy = [(model.encode(input_of(b))[:, 0].float().cpu(), train.probe_targets(b["state"][:, 0]))
                  for b in batches(split, 1, n, f"jepa tokens ({split})")]
            return torch.cat([t[0] for t in zy]), torch.cat([t[1] for t in zy])
        (zf, yf), (zv, yv) = tokens("train", cfg.probe_windows), tokens("val", cfg.windows)
        out.update({**train.token_stats(zv), **train.probe_r2(zf, yf, zv, yv), "token_dim": zv[0].numel()})
    if mc.tokens == "jepa" and mc.variant == "baseline" and cfg.gap_tasks > 0:  # la/vq: no recorded plan of latents
        stats, tasks = ckpt["stats"], plan.make_tasks(root, "val", "open-loop", cfg.gap_tasks, cfg.seed, mc.img_size)
        enc = lambda s: model.encode(input_of(dino.batch_of_states(s, mc)))[:, 0]  # noqa: E731  (E, P, D)
        z0, zg = enc(tasks["start_state"]), enc(tasks["goal_state"])
        p0 = plan.proprio_of(tasks["start_state"], stats, device) if mc.proprio else None  # (E, 4)
        pg = model.embed_proprio(plan.proprio_of(tasks["goal_state"], stats, device)) if mc.proprio else None
        true = torch.as_tensor(data.env_to_macro(tasks["actions"], stats["action_mean"], stats["action_std"]),
                               dtype=torch.float32, device=device)  # (E, H, A) the recorded macro actions
        mu = plan.cem_gaussian(lambda s: plan.rollout_cost(model, z0, zg, s, p0, pg), torch.zeros_like(true),
                               torch.ones_like(true), opt_steps=GAP_OPT_STEPS,
                               generator=torch.Generator(device).manual_seed(cfg.seed))  # (E, H, A)
        # a plan far cheaper than the truth in the model's eyes (missing the goal) is a model error the planner exploits
        c_plan, c_true = plan.rollout_cost(model, z0, zg, torch.stack([mu, true], 1), p0, pg).unbind(1)  # (E,) each
        out.update(gap_cost_plan=summarize(c_plan.cpu()), gap_cost_true=summarize(c_true.cpu()),
                   gap_plan_cheaper=(c_plan < c_true).float().mean().item())
    out["seconds"] = time.time() - t0
    print(f"{run}: evaluated in {out['seconds']:.1f} s")
    return out


def draw_plot(lines, title, xlabel, ylabel, log_x=False, hlines=(), top=None, w=760, h=500):
    """A line plot with 95% interval bars, axes, ticks and a legend -> BGR image. lines: [(label, xs, ys, cells with
    the points' "ci95")]; hlines: [(label, y)] drawn dashed across (references); log_x: a log10 x axis; top: y's end."""
    img = np.full((h, w, 3), 255, np.uint8)
    x0, x1, y0, y1 = 90, w - 30, h - 70, 50  # plot area in image px (y grows downwards)
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)  # noqa: E731
    xs = [tx(x) for _, xx, *_ in lines for x in xx]
    pad = 0.08 * (max(xs) - min(xs)) if log_x else 0  # points off the axes on a log scale
    xmin, xmax = min(xs) - pad, (max(xs) if max(xs) > min(xs) else min(xs) + 1) + pad
    top = top or max([c["ci95"][1] for *_, cells in lines for c in cells] + [y for _, y in hlines]) or 1.0
    base = 10 ** np.floor(np.log10(top / 5))
    step = base * next(f for f in (1, 2, 5, 10) if f * base >= top / 5)  # round ticks: 1, 2 or 5 x 10^k
    ymax = step * np.ceil(top / step)
    X = lambda v: int(x0 + (tx(v) - xmin) / (xmax - xmin) * (x1 - x0))  # noqa: E731
    Y = lambda v: int(y0 - max(v, 0) / ymax * (y0 - y1))  # noqa: E731
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    put = lambda text, xy, size=0.5: cv2.putText(img, text, xy, font, size, black, 1, cv2.LINE_AA)  # noqa: E731
    cv2.line(img, (x0, y0), (x1, y0), black, 1), cv2.line(img, (x0, y0), (x0, y1), black, 1)
    for t in sorted({x for _, xx, *_ in lines for x in xx}):  # x ticks at the measured points
        cv2.line(img, (X(t), y0), (X(t), y0 + 5), black, 1)
        tick = f"{t:,.0f}" if t >= 1000 else f"{t:g}"
        put(tick, (X(t) - 4 * len(tick), y0 + 22), 0.45)
    for v in np.arange(0, ymax + step / 2, step):  # y ticks with light grid lines
        cv2.line(img, (x0 - 5, Y(v)), (x0, Y(v)), black, 1), cv2.line(img, (x0, Y(v)), (x1, Y(v)), (230, 230, 230), 1)
        put(f"{v:.3g}", (8, Y(v) + 5), 0.45)
    put(title, (10, 28), 0.55), put(xlabel, (x0 + 120, h - 20))
    label = np.full((20, 260, 3), 255, np.uint8)  # the y label, drawn flat then rotated (OpenCV has no rotated text)
    cv2.putText(label, ylabel, (4, 15), font, 0.5, black, 1, cv2.LINE_AA)
    label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)  # (260, 20, 3)
    yc = (y0 + y1) // 2
    img[yc - 130:yc + 130, 62:82] = np.minimum(img[yc - 130:yc + 130, 62:82], label)
    for i, (name, y) in enumerate(hlines):  # dashed reference lines, labelled at the right end
        for xa in range(x0, x1, 12):
            cv2.line(img, (xa, Y(y)), (min(xa + 6, x1), Y(y)), (120, 120, 120), 1)
        put(f"{name} {y:.2f}", (x1 - 110 - 120 * i, Y(y) - 4), 0.4)
    for i, (name, xx, ys, cells) in enumerate(lines):
        col = COLOURS[i % len(COLOURS)]
        pts = [(X(x), Y(y)) for x, y in zip(xx, ys)]
        cv2.polylines(img, [np.array(pts, np.int32)], False, col, 2, cv2.LINE_AA)
        for (px, py), c in zip(pts, cells):
            cv2.circle(img, (px, py), 4, col, -1, cv2.LINE_AA)
            cv2.line(img, (px, Y(c["ci95"][0])), (px, Y(c["ci95"][1])), col, 1)  # 95% interval
        cv2.line(img, (x0 + 15, y1 + 15 + 20 * i), (x0 + 45, y1 + 15 + 20 * i), col, 2)  # legend entry
        put(name, (x0 + 52, y1 + 20 + 20 * i))
    return img


def main(cfg: EvalConfig):
    # --- setup
    device, ctx = data.setup(cfg.device, cfg.seed)
    out = Path(cfg.out)  # a .json, never a checkpoint or another file of the user's; likewise what goes next to it
    plot = Path(cfg.plot) if cfg.plot else out.with_name(out.stem + "_rollout.png")
    protocols = tuple(plan.PROTOCOL_EPISODES)  # ("open-loop", "mpc")
    data.writable(out, "--out", lambda old: all(isinstance(m, dict) and "latent_mse" in m for m in old.values()))
    data.writable(out.with_name(out.stem + "_success.json"), "--out", lambda old: set(old) <= set(protocols))
    for png, flag in ((plot, "--plot"), (out.with_name(out.stem + "_labels.png"), "--out")):
        data.writable(png, flag, png=True)
    names = [Path(r).name for r in cfg.run]
    names = names if len(set(names)) == len(names) else [str(r) for r in cfg.run]  # keep columns distinct

    # --- the success table first (cheap; a bad --results file fails before any model work): {protocol: {column:
    # [cells with k, n, rate, Wilson 95% CI]}}; random, replay and ceiling from each file's reference block
    success, ci = {}, lambda c: f"{c['rate']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"  # noqa: E731
    for path in map(Path, cfg.results):
        fix = f"--results {path}: not a RESULTS.json of plan.py or policy.py; rerun the command that wrote it"
        r = data.load_json(path, fix, plan.RESULT_KEYS)
        ref, ok = r["reference"], lambda x: isinstance(x, (int, float)) and 0 <= x <= 1  # noqa: E731
        require(r["protocol"] in protocols and isinstance(r["successes"], list) and r["successes"] and
                set(r["successes"]) <= {0, 1} and isinstance(ref, dict) and ok(ref.get("random")) and
                ok(ref.get("replay")) and (ref.get("ceiling") is None or ok(ref["ceiling"]) and
                                           isinstance(ref.get("ceiling_episodes"), int)), fix)
        column = r["planner"] if r["planner"] in ("gcbc", "iql") else r["variant"] + (
            " + adapter" if r["via"] == "adapter" else "")
        cols = success.setdefault(r["protocol"], {})
        k, n = sum(r["successes"]), len(r["successes"])
        cols.setdefault(column, []).append(dict(k=k, n=n, rate=k / n, ci95=plan.wilson(k, n), file=str(path),
                                                tokens=r.get("tokens"), seconds_per_solve=r.get("seconds_per_solve"),
                                                via=r["via"], labels=r["labels"], data=r.get("data")))
        for name, m in (("random", n), ("replay", n), ("ceiling", ref.get("ceiling_episodes"))):
            if ref.get(name) is not None:  # the ceiling ran on the first m tasks only
                k = round(ref[name] * m)
                cols.setdefault(name, []).append(dict(rate=ref[name], n=m, k=k, ci95=plan.wilson(k, m), file=str(path)))
    for cols in success.values():  # the references repeat in every file of a protocol: keep one, warn if they differ
        for name in REFS:
            cells = cols.get(name, [])
            if len({(c["k"], c["n"]) for c in cells}) > 1:
                print(f"warning: the {name} reference differs between files ({[c['file'] for c in cells]}): "
                      "they were not planned on the same tasks")
            cols[name] = cells[:1]

    # --- per-run metrics, in the precision the runs trained in (bf16 autocast on CUDA), the encoder included
    with ctx:
        metrics = {name: evaluate_run(run, cfg, device) for name, run in zip(names, cfg.run)}
    if len({m["dataset"] for m in metrics.values()}) > 1:
        print("WARNING: these runs were trained on different datasets (see the dataset row): not comparable")

    # --- write and print: the metrics table (a column per run, a row per metric some run has), the rollout plot
    if metrics:
        n_win = max(m["latent_mse_stats"]["n"] for m in metrics.values())
        has = lambda k, f: lambda m: f(m) if k in m else "–"  # noqa: E731
        stat = lambda k: has(k, lambda m: (  # noqa: E731  a stats dict -> 'mean ± std [lo, hi] (n)'
            f"{m[k]['mean']:.4g} ± {m[k]['std']:.2g} [{m[k]['ci95'][0]:.4g}, {m[k]['ci95'][1]:.4g}] (n={m[k]['n']})"
            if "mean" in m[k] else f"too few windows ({m[k]['too_few']}, need {m[k]['need']})"))
        of_k = lambda k: has(k, lambda m: f"{m[k]:.4g} / {m['num_codes']}")  # noqa: E731
        rows = [("variant (tokens)", lambda m: f"{m['variant']} ({m['tokens']})"),
                ("dataset (fingerprint)", lambda m: m["dataset"]), ("train step", lambda m: str(m["step"])),
                ("latent_mse (1 step, val)", stat("latent_mse_stats")),
                (f"rollout_mse (h={cfg.horizon}; la/vq: teacher-forced by IDM latents)", stat("rollout_mse_stats")),
                (f"rollout curve h=1..{cfg.horizon}",
                 lambda m: ", ".join(f"{c['mean']:.3g}" for c in m["rollout_curve"])),
                ("swap_score (flag > 0.65)", stat("swap_score_stats")),
                ("shuffle_delta (flag < 0.05)", stat("shuffle_delta_stats")),
                ("probe R² latent → action", stat("probe_r2")), ("perplexity / K", of_k("perplexity")),
                ("dead codes / K", of_k("dead_codes")),
                ("decoder val RMSE (px/step)", has("decoder", lambda m: "missing or stale: run decode.py" if "error" in
                                                   m["decoder"] else f"{m['decoder']['val_rmse_px']:.2f} px "
                                                                     f"({m['decoder']['labels']} labels)")),
                (f"jepa token std min / median (collapsed < {train.COLLAPSE_STD})", has("collapsed", lambda m: (
                    f"{m['token_std_min']:.3g} / {m['token_std_median']:.3g}" +
                    (" **COLLAPSED**" if m["collapsed"] else "")))),
                ("jepa effective rank / D",
                 has("effective_rank", lambda m: f"{m['effective_rank']:.1f} / {m['token_dim']}")),
                ("jepa probe R² agent / block / angle", has("probe_agent", lambda m: " / ".join(
                    f"{m['probe_' + k]:.3f}" for k in train.PROBE_GROUPS))),
                ("jepa model cost: own plan vs true actions", has("gap_cost_plan", lambda m: (
                    f"{m['gap_cost_plan']['mean']:.3g} vs {m['gap_cost_true']['mean']:.3g} (plan cheaper on "
                    f"{m['gap_plan_cheaper']:.0%} of {m['gap_cost_plan']['n']} tasks)")))]
        cells = [[label] + [f(m) for m in metrics.values()] for label, f in rows]
        print("\n".join(markdown(["metric", *metrics], [c for c in cells if set(c[1:]) != {"–"}])))
        print(f"\nmean ± std [95% interval of the mean] (n = val windows; swap/shuffle: n = batches of "
              f"{cfg.batch_size}; probe: bootstrap interval), seed {cfg.seed}.")
        lines = [(name if name == m["variant"] else f"{name} ({m['variant']})", range(1, cfg.horizon + 1),
                  [c["mean"] for c in m["rollout_curve"]], m["rollout_curve"]) for name, m in metrics.items()]
        title = f"open-loop rollout error vs horizon (val, {n_win} windows, seed {cfg.seed}; bars: 95% interval)"
        data.write_png(plot, draw_plot(lines, title, "horizon (macro steps of 5 env steps)", "latent MSE (val)"))
        data.atomic_write(out, metrics)
        print(f"wrote {out} and {plot}")
    # the success table: one row per protocol, columns from floor to ceiling, a cell 'rate [95% CI] (k/n)' per file
    if success:
        cols = [c for c in COLUMNS if any(c in t for t in success.values())]
        cols += sorted({c for t in success.values() for c in t} - set(cols))
        cell = lambda cs: " / ".join(f"{ci(c)} ({c['k']}/{c['n']})" for c in cs) or "–"  # noqa: E731  a file each
        print("\nsuccess rate [Wilson 95% interval] (successes/tasks); random, ceiling and replay on the same tasks "
              "(the ceiling on the first n of them):\n" + "\n".join(markdown(
                  ["protocol", *cols], [[p] + [cell(t.get(c, [])) for c in cols] for p, t in sorted(success.items())])))
        data.atomic_write(out.with_name(out.stem + "_success.json"), success)

    # --- a label sweep (a method at several label counts): every row that used labels, by how it uses them (la and
    # vq rows named by their decoder or adapter); per protocol success against labelled transitions, and a plot
    rows = {}
    for protocol, col, c in [(p, col, c) for p, cols in success.items() for col, cs in cols.items() for c in cs]:
        if c.get("labels") is not None and col not in REFS:
            name = col if c["via"] != "decoder" else f"{col} + decoder"
            rows.setdefault(protocol, {}).setdefault(name, []).append(c)
    if not any(len({c["labels"] for c in cs}) > 1 for r in rows.values() for cs in r.values()):
        return metrics, success
    rows = {p: {k: sorted(cs, key=lambda c: c["labels"]) for k, cs in r.items()} for p, r in rows.items()}
    print()
    for protocol, methods in sorted(rows.items()):  # a column per label count, with its fraction of the labelled pool
        counts = sorted({c["labels"] for cs in methods.values() for c in cs})
        roots = {c["data"] for cs in methods.values() for c in cs if c.get("data") and Path(c["data"]).is_dir()}
        pool = max(len(data.WindowDataset(r, "train", 2)) for r in roots) if roots else None  # the labelled windows
        head = [f"{n:,}" + (f" ({n / pool:.1%})" if pool and n < pool else " (all)" if n == pool else "")
                for n in counts]
        at = {name: {c["labels"]: c for c in cs} for name, cs in methods.items()}
        cells = [[name] + [ci(a[n]) if n in a else "–" for n in counts] for name, a in at.items()]
        print(f"success on {protocol} tasks against labelled transitions (windows of 5 env steps):")
        print("\n".join(markdown(["method", *head], cells)))
        refs = success[protocol]
        print("references (no labels): " + ", ".join(f"{k} {refs[k][0]['rate']:.2f} ({refs[k][0]['k']}/"
                                                     f"{refs[k][0]['n']})" for k in REFS if refs.get(k)))
    protocol = "open-loop" if "open-loop" in rows else sorted(rows)[0]
    lines = [(name, [c["labels"] for c in cs], [c["rate"] for c in cs], cs) for name, cs in rows[protocol].items()]
    hlines = [(k, success[protocol][k][0]["rate"]) for k in ("ceiling", "random") if success[protocol].get(k)]
    n = max(c["n"] for cs in rows[protocol].values() for c in cs)
    plot = out.with_name(out.stem + "_labels.png")
    data.write_png(plot, draw_plot(lines, f"success on {n} {protocol} tasks against labels (bars: Wilson 95%)",
                                   "labelled transitions (log scale)", "success rate", True, hlines, 1.0))
    print(f"wrote {plot}")
    return metrics, success


if __name__ == "__main__":
    data.cli(main, EvalConfig, doc=__doc__)
