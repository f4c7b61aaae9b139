"""Offline world-model metrics for one or more runs, side by side (method.md s7, s10).

Success rate says whether planning worked; these metrics say why. Per run, on seeded draws of val windows:
one-step teacher-forced latent MSE; open-loop rollout MSE at horizons 1..H (baseline: true actions; la/vq:
the IDM on each real frame pair, T = 2 as trained); for la/vq swap score, shuffle delta and the R^2 of a linear
probe latent action -> true action (fit on train windows); for vq perplexity, dead codes and code usage.
Reads RUN/ckpt.pt (+ RUN/decode.json), the run's dataset, optional plan.py RESULTS.json files. Writes
METRICS.json {run name: {metric: value, metric_stats: {mean, std, ci95, n}, ...}} atomically, a rollout-error
PNG next to it, and prints a markdown table (one column per run; success rates per protocol with --results).
GPU:  python eval.py --run runs/baseline --run runs/la --run runs/vq --out runs/metrics.json --results runs/results/*.json
      (--run runs/{baseline,la,vq} works too; wall-clock on H200: not yet measured)
CPU:  python eval.py --run /tmp/tiny/baseline --run /tmp/tiny/vq --out /tmp/tiny/metrics.json --windows 32 --device cpu
"""
import argparse
import dataclasses
import inspect
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import decode
import dino
import wm
from train import get_tokens, write_json


@dataclass
class EvalConfig:
    run: list = field(default_factory=list)  # run folders; repeat (--run A --run B) or list (--run A B) to compare
    out: str = "metrics.json"  # METRICS.json path (written atomically)
    results: list = field(default_factory=list)  # plan.py RESULTS.json files whose success rates join the table
    windows: int = 600  # seeded val windows per metric (method.md s10: R = 600), capped at what exists
    horizon: int = 5  # open-loop rollout horizon in macro steps (the planning horizon; method.md s10)
    probe_windows: int = 5000  # train windows fitting the linear probe latent action -> true action
    batch_size: int = 64  # windows per batch; swap score and shuffle delta use the seed's batch of 64
    plot: str = ""  # rollout-error PNG; "" = next to --out as <out stem>_rollout.png
    workers: int = 2  # DataLoader processes rendering frames (only used without a feature cache)
    device: str = "auto"  # auto, cpu or cuda (auto picks cuda when present)
    seed: int = 0  # seeds window draws and the swap/shuffle permutations
    dino_weights: str = ""  # DINOv2 weights PATH or "random"; "" = each run's own


# Shape legend: B batch, T frames, P patches, D DINO width, A macro action, C conditioning, K codes, H horizon,
# N windows. Colours (BGR) of the plot lines, one per run.
COLOURS = [(200, 80, 30), (40, 140, 40), (30, 30, 200), (150, 60, 150), (0, 140, 200), (90, 90, 90)]


def parse_config(cls, argv=None):
    """Flags from the dataclass: --field-name, help = the field's trailing comment, default shown.

    Extension for this script: list fields take one or more values and may repeat (--run A --run B)."""
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kw = dict(action=argparse.BooleanOptionalAction) if f.type in (bool, "bool") else dict(type=type(default))
        if isinstance(default, list):
            kw = dict(action="extend", nargs="+", type=str)
        p.add_argument("--" + f.name.replace("_", "-"), default=default, help=helps.get(f.name, " "), **kw)
    return cls(**vars(p.parse_args(argv)))


def summarize(x):
    """Per-window values (N,) -> mean, std, 95% interval of the mean (normal approximation), n."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()  # (N,)
    m, s = x.mean().item(), (x.std().item() if len(x) > 1 else 0.0)
    h = 1.96 * s / max(len(x), 1) ** 0.5
    return {"mean": m, "std": s, "ci95": [m - h, m + h], "n": len(x)}


def r2_score(pred, y):
    """Mean over dims of R^2 = 1 - SS_res / SS_tot, and the per-dim values. (N, A) -> (), (A,)"""
    r2 = 1 - (pred - y).pow(2).sum(0) / (y - y.mean(0)).pow(2).sum(0).clamp_min(1e-12)  # (A,)
    return r2.mean(), r2


def linear_probe(x_fit, y_fit, x, y, generator, boots=200):
    """Least-squares probe y ~ [x, 1] W fitted on (x_fit, y_fit), scored on (x, y) by R^2 with a bootstrap CI.

    How much of the true action a linear read-out finds in the latent action (1 = all, 0 = none)."""
    ones = lambda v: torch.cat([v, torch.ones(len(v), 1, dtype=v.dtype)], 1)  # noqa: E731  (N, C+1) with bias
    W = torch.linalg.lstsq(ones(x_fit.double()), y_fit.double()).solution  # (C+1, A)
    pred = ones(x.double()) @ W  # (N, A)
    r2, per_dim = r2_score(pred, y.double())
    boot = torch.stack([r2_score(pred[i], y.double()[i])[0]
                        for i in torch.randint(len(y), (boots, len(y)), generator=generator)])  # (boots,)
    ci = boot.quantile(torch.tensor([0.025, 0.975], dtype=boot.dtype))  # (2,) percentile interval
    return {"mean": r2.item(), "std": boot.std().item(), "ci95": ci.tolist(), "n": len(y), "n_fit": len(y_fit),
            "per_dim": per_dim.tolist()}


def batches(ds, n, cfg, device, desc):
    """Seeded draw of min(n, len(ds)) windows (without replacement), batched and moved to the device."""
    idx = np.random.default_rng(cfg.seed).choice(len(ds), min(n, len(ds)), replace=False)
    loader = decode.window_loader(ds, idx.tolist(), cfg.batch_size, cfg.workers, device)
    for b in tqdm(loader, desc=desc, leave=False):
        yield {k: v.to(device, non_blocking=True) for k, v in b.items()}


@torch.no_grad()
def one_step_mse(model, z, action=None, proprio=None):
    """Teacher-forced next-frame error per window, visual dims (method.md s10) -> (B,), and the conditioning dict.

    z (B, num_hist+1, P, D); conditioning as in training (baseline: true actions; la: IDM latent; vq: its code)."""
    n, D = model.cfg.num_hist, model.cfg.visual_dim
    c = model.conditioning(z, action)
    pred = model.predict(model.observe(z, proprio)[:, :n], c["cond"][:, :n])[..., :D]  # (B, n, P, D)
    return (pred - z[:, 1:]).pow(2).mean((1, 2, 3)), c  # (B,)


@torch.no_grad()
def rollout_mse(model, z, action=None, proprio=None):
    """Open-loop error per window and horizon from the single real frame z[:, 0] -> (B, H), z (B, H+1, P, D).

    baseline: the true actions; la/vq: the IDM on every consecutive real pair separately, T = 2 as in training
    (not on the whole clip: defect 5)."""
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
    model, ckpt, root = decode.open_run(run, device)
    mc, tc, variant = ckpt["model_config"], ckpt["train_config"], ckpt["model_config"]["variant"]
    n, H, size, name = mc["num_hist"], cfg.horizon, tc["dino_size"], Path(run).name
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {"run": str(run), "variant": variant, "dataset": ckpt["data"]["fingerprint"], "step": ckpt["step"],
           "seed": cfg.seed}
    t0 = time.time()
    unpack = lambda b: (get_tokens(b, enc, size), b["action"], b["proprio"] if mc["proprio"] else None)  # noqa: E731

    # One-step latent MSE, plus swap/shuffle and the val side of the probe (la/vq) on the same windows.
    ds, enc = decode.window_source(ckpt, root, "val", n + 1, cfg.dino_weights, device)
    mse, swaps, shuffles, lat, act, codes = [], [], [], [], [], []
    for b in batches(ds, cfg.windows, cfg, device, f"{name}: one-step"):
        z, a, p = unpack(b)  # (B, n+1, P, D), (B, n+1, A), (B, n+1, 4) | None
        err, c = one_step_mse(model, z, a, p)
        mse.append(err.cpu())  # (B,)
        if variant != "baseline":
            swaps.append(wm.swap_score(model, z, a, p, generator=gen))
            shuffles.append(wm.shuffle_delta(model, z, a, p, generator=gen))
            lat.append(c["cond"][:, 0].float().cpu()), act.append(a[:, 0].cpu())  # (B, C), (B, A)
        if variant == "vq":
            codes.append(c["codes"][:, 0].cpu())  # (B,) the window's first real transition
    out["latent_mse_stats"] = summarize(torch.cat(mse))
    out["latent_mse"] = out["latent_mse_stats"]["mean"]

    # Open-loop rollout over H macro steps on windows of H+1 frames.
    ds, enc = decode.window_source(ckpt, root, "val", H + 1, cfg.dino_weights, device, enc)
    err = [rollout_mse(model, *unpack(b)).cpu() for b in batches(ds, cfg.windows, cfg, device, f"{name}: rollout")]
    err = torch.cat(err)  # (N, H)
    out["rollout_curve"] = [summarize(err[:, h]) for h in range(H)]
    out["rollout_mse"], out["rollout_mse_stats"] = out["rollout_curve"][-1]["mean"], out["rollout_curve"][-1]

    if variant != "baseline":
        out["swap_score_stats"], out["shuffle_delta_stats"] = summarize(swaps), summarize(shuffles)  # n = batches
        out["swap_score"], out["shuffle_delta"] = out["swap_score_stats"]["mean"], out["shuffle_delta_stats"]["mean"]
        # Linear probe latent -> true macro action, fitted on train windows (2 frames: one transition each).
        ds, enc = decode.window_source(ckpt, root, "train", 2, cfg.dino_weights, device, enc)
        fit = [(model.conditioning(get_tokens(b, enc, size))["cond"][:, 0].float().cpu(), b["action"][:, 0].cpu())
               for b in batches(ds, cfg.probe_windows, cfg, device, f"{name}: probe fit")]  # (B, C), (B, A)
        out["probe_r2"] = linear_probe(torch.cat([f[0] for f in fit]), torch.cat([f[1] for f in fit]),
                                       torch.cat(lat), torch.cat(act), gen)
        out["decoder"] = decoder_summary(run, ckpt)
    if variant == "vq":
        codes, K = torch.cat(codes), mc["num_codes"]
        out["perplexity"], out["dead_codes"] = wm.perplexity(codes, K)
        out.update(num_codes=K, code_usage=torch.bincount(codes, minlength=K).tolist())
    out["seconds"] = time.time() - t0
    print(f"{run}: evaluated in {out['seconds']:.1f} s "
          f"({out['latent_mse_stats']['n'] / out['seconds']:.1f} val windows/s, all metrics)")
    return out


def decoder_summary(run, ckpt):
    """The action decoder's val accuracy and label budget from RUN/decode.json, or why there is none."""
    try:
        decode.load_decoder(run, ckpt, "cpu")
    except (FileNotFoundError, ValueError) as e:
        print(f"note: {e}")
        return {"error": str(e), "status": "missing" if isinstance(e, FileNotFoundError) else "stale"}
    rep = json.loads((Path(run) / "decode.json").read_text())
    return {"val_rmse_px": rep["val_rmse_px"], "r2_mean": rep["r2_mean"],
            "train_pairs": rep["label_budget"]["train_pairs"]}


def load_results(paths, metrics):
    """plan.py RESULTS.json files -> {run name: [result, ...]}, matched by their "run" field, else by variant."""
    by_run = {name: [] for name in metrics}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: results file not found (written by plan.py --out)")
        r = json.loads(path.read_text())
        missing = [k for k in ("variant", "protocol", "success_rate", "episodes") if k not in r]
        if missing:
            raise ValueError(f"{path}: not a plan.py RESULTS.json (missing {', '.join(missing)})")
        if "run" in r:
            hits = [k for k, m in metrics.items() if Path(m["run"]).resolve() == Path(r["run"]).resolve()]
        else:
            hits = [k for k, m in metrics.items() if m["variant"] == r["variant"]]
        if len(hits) != 1:
            print(f"warning: {path} ({r['variant']}, run {r.get('run', '?')}) matches {len(hits)} of the runs; "
                  "left out of the table")
            continue
        by_run[hits[0]].append({"file": str(path), **r})
    return by_run


def fmt(s):
    """Stats dict -> 'mean ± std [lo, hi] (n)'."""
    return f"{s['mean']:.4g} ± {s['std']:.2g} [{s['ci95'][0]:.4g}, {s['ci95'][1]:.4g}] (n={s['n']})"


def success_cell(results):
    """One table cell from the RESULTS.json files of one run and protocol (mean ± std over files, e.g. seeds)."""
    sr = np.array([r["success_rate"] for r in results])
    ref = results[0].get("reference", {})
    head = f"{sr[0]:.2f}" if len(sr) == 1 else f"{sr.mean():.2f} ± {sr.std(ddof=1):.2f} ({len(sr)} files)"
    return (f"{head} (n={results[0]['episodes']}; random {ref.get('random', float('nan')):.2f}, replay "
            f"{ref.get('replay', float('nan')):.2f}; {results[0].get('seconds_per_solve', float('nan')):.2f} s/solve)")


def decoder_cell(m):
    """Table entry for the action decoder: val accuracy and label budget, or why there is none."""
    d = m.get("decoder")
    if d is None:
        return "–"
    return f"{d['status']}: run decode.py" if "error" in d else f"{d['val_rmse_px']:.2f} px ({d['train_pairs']} pairs)"


def markdown_table(metrics, horizon):
    """One column per run, one row per metric, then one row per planning protocol found in --results."""
    stat = lambda k: lambda m: fmt(m[k]) if k in m else "–"  # noqa: E731
    of_k = lambda k: lambda m: f"{m[k]:.4g} / {m['num_codes']}" if k in m else "–"  # noqa: E731
    rows = [("variant", lambda m: m["variant"]), ("dataset (fingerprint)", lambda m: m["dataset"]),
            ("train step", lambda m: str(m["step"])), ("latent_mse (1 step, val)", stat("latent_mse_stats")),
            (f"rollout_mse (h={horizon})", stat("rollout_mse_stats")),
            (f"rollout curve h=1..{horizon}", lambda m: ", ".join(f"{c['mean']:.3g}" for c in m["rollout_curve"])),
            ("swap_score (flag > 0.65)", stat("swap_score_stats")),
            ("shuffle_delta (flag < 0.05)", stat("shuffle_delta_stats")),
            ("probe R² latent → action", stat("probe_r2")), ("perplexity / K", of_k("perplexity")),
            ("dead codes / K", of_k("dead_codes")), ("decoder val RMSE (px/step)", decoder_cell)]
    for p in sorted({p for m in metrics.values() for p in m.get("success", {})}):
        rows.append((f"success rate ({p})", lambda m, p=p: success_cell(m["success"][p]) if p in m.get("success", {})
                     else "–"))
    lines = ["| metric | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    return "\n".join(lines + [f"| {label} | " + " | ".join(f(m) for m in metrics.values()) + " |" for label, f in rows])


def draw_curves(metrics, horizon, title, w=720, h=480):
    """Rollout MSE vs horizon, one line per run with 95% error bars, axes, ticks, labels and a legend -> BGR image."""
    img = np.full((h, w, 3), 255, np.uint8)
    x0, x1, y0, y1 = 90, w - 30, h - 70, 50  # plot area in image px (y grows downwards)
    top = max(c["ci95"][1] for m in metrics.values() for c in m["rollout_curve"]) or 1.0
    base = 10 ** np.floor(np.log10(top / 5))
    step = base * next(f for f in (1, 2, 5, 10) if f * base >= top / 5)  # round ticks: 1, 2 or 5 x 10^k
    ymax = step * np.ceil(top / step)
    X = lambda t: int(x0 + (t - 1) / max(horizon - 1, 1) * (x1 - x0))  # noqa: E731  horizon -> image x
    Y = lambda v: int(y0 - max(v, 0) / ymax * (y0 - y1))  # noqa: E731  MSE -> image y
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    cv2.line(img, (x0, y0), (x1, y0), black, 1), cv2.line(img, (x0, y0), (x0, y1), black, 1)
    for t in range(1, horizon + 1):  # x ticks: macro steps
        cv2.line(img, (X(t), y0), (X(t), y0 + 5), black, 1)
        cv2.putText(img, str(t), (X(t) - 5, y0 + 22), font, 0.5, black, 1, cv2.LINE_AA)
    for v in np.arange(0, ymax + step / 2, step):  # y ticks with light grid lines
        cv2.line(img, (x0 - 5, Y(v)), (x0, Y(v)), black, 1), cv2.line(img, (x0, Y(v)), (x1, Y(v)), (230, 230, 230), 1)
        cv2.putText(img, f"{v:.3g}", (8, Y(v) + 5), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.putText(img, title, (10, 28), font, 0.55, black, 1, cv2.LINE_AA)
    cv2.putText(img, "horizon (macro steps of 5 env steps)", (x0 + 120, h - 20), font, 0.5, black, 1, cv2.LINE_AA)
    label = np.full((20, 220, 3), 255, np.uint8)  # the y label, drawn flat then rotated (OpenCV has no rotated text)
    cv2.putText(label, "latent MSE (val)", (4, 15), font, 0.5, black, 1, cv2.LINE_AA)
    label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)  # (220, 20, 3)
    yc = (y0 + y1) // 2
    img[yc - 110:yc + 110, 62:82] = np.minimum(img[yc - 110:yc + 110, 62:82], label)
    for i, (name, m) in enumerate(metrics.items()):
        col, curve = COLOURS[i % len(COLOURS)], m["rollout_curve"]
        pts = [(X(t + 1), Y(c["mean"])) for t, c in enumerate(curve)]
        cv2.polylines(img, [np.array(pts, np.int32)], False, col, 2, cv2.LINE_AA)
        for (px, py), c in zip(pts, curve):
            cv2.circle(img, (px, py), 4, col, -1, cv2.LINE_AA)
            cv2.line(img, (px, Y(c["ci95"][0])), (px, Y(c["ci95"][1])), col, 1)  # 95% interval
        cv2.line(img, (x0 + 15, y1 + 15 + 20 * i), (x0 + 45, y1 + 15 + 20 * i), col, 2)  # legend entry
        legend = name if name == m["variant"] else f"{name} ({m['variant']})"
        cv2.putText(img, legend, (x0 + 52, y1 + 20 + 20 * i), font, 0.5, black, 1, cv2.LINE_AA)
    return img


def main(cfg):
    print(asdict(cfg))
    if not cfg.run:
        raise ValueError("no run given: pass --run RUN (repeat --run for side-by-side)")
    if cfg.windows < 2 or cfg.horizon < 1:
        raise ValueError(f"--windows {cfg.windows} / --horizon {cfg.horizon}: need at least 2 windows and horizon 1")
    device = dino.resolve_device(cfg.device)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    names = [Path(r).name for r in cfg.run]
    names = names if len(set(names)) == len(names) else [str(r) for r in cfg.run]  # keep columns distinct
    metrics = {name: evaluate_run(run, cfg, device) for name, run in zip(names, cfg.run)}
    for name, res in load_results(cfg.results, metrics).items():
        for r in res:  # grouped by protocol; several files per protocol (e.g. seeds) are averaged in the table
            metrics[name].setdefault("success", {}).setdefault(r["protocol"], []).append(r)
    table = markdown_table(metrics, cfg.horizon)
    if len({m["dataset"] for m in metrics.values()}) > 1:
        warn = ("WARNING: these runs were trained on different datasets (see the dataset row); their numbers are "
                "not comparable.")
        print(warn)
        table += "\n\n" + warn
    n_win = {m["latent_mse_stats"]["n"] for m in metrics.values()}
    table += (f"\n\nmean ± std [95% interval of the mean] (n = val windows; swap/shuffle: n = batches of "
              f"{cfg.batch_size}; probe: bootstrap interval), seed {cfg.seed}, windows {sorted(n_win)}.")
    print(table)

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = Path(cfg.plot) if cfg.plot else out.with_name(out.stem + "_rollout.png")
    title = f"open-loop rollout error vs horizon (val, {max(n_win)} windows, seed {cfg.seed}; bars: 95% interval)"
    decode.write_png(plot, draw_curves(metrics, cfg.horizon, title))
    write_json(out, metrics)
    print(f"wrote {out} and {plot}")
    return metrics


if __name__ == "__main__":
    main(parse_config(EvalConfig))
