"""The two ways a world model trained without action labels (`la`, `vq`) meets the simulator's actions, each fitted
on a small labelled set of pairs (the frozen IDM labels a window (o_t, o_t+5) with z; the dataset gives the action):
decoder (the seed's train_action_decoder.py, MacroActionDecoderStd): (tokens P_t, latent z) -> normalised 10-d macro
  action; plan.py plans latents and decodes them.
adapter (ours): (tokens P_t, macro action a_t) -> the conditioning the predictor saw (la: the IDM's latent; vq: its
  code); plan.py --via adapter plans real actions through it, as the baseline plans.
Reads RUN/ckpt.pt and the run's dataset (--data for a moved run). Writes RUN/decoder.pt + RUN/decode.json (val RMSE
in px per env step, R^2 per dim, labels used; vq: each code's mean push, RUN/codes.png), or RUN/adapter.{pt,json}.
With --unlabelled the adapter also fits on unlabelled train windows, whose actions an inverse model fitted on the
pairs infers (pseudo-labels, as VPT: Baker et al. 2022): the labels spent stay the pairs.
GPU:  python decode.py --run runs/full/vq                 (100k + 10k pairs of DINOv2 tokens; H200: not yet measured)
CPU:  python decode.py --run runs/quick/vq --pairs 20000 --val-pairs 2000     (state tokens: ~15 s on 2 cores)
      python decode.py --run runs/quick/la --head adapter --ensemble 5 --pairs 18000 --val-pairs 2000 --unlabelled -1
"""
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dino
import wm
from data import require


@dataclass
class DecodeConfig:
    run: str = ""  # run folder written by train.py (reads ckpt.pt, writes decoder.pt + decode.json, or adapter.*)
    head: Literal["decoder", "adapter"] = "decoder"  # decoder: latent -> action (seed); adapter: action -> latent
    data: str = ""  # dataset folder, "" = the one the run was trained on (for a run moved away from its data)
    pairs: int = 100_000  # label budget: labelled train transitions the decoder may use (seed: 100,000)
    val_pairs: int = 10_000  # labelled val transitions for early stopping and the report (seed: 10,000)
    ensemble: int = 1  # adapters fitted on the same pairs (own init and order) and averaged: less error to exploit
    unlabelled: int = 0  # adapter: also fit on N more train windows, pseudo-labelled from the pairs (VPT); -1: all
    batch_size: int = 256  # decoder training batch (seed train_action_decoder.py)
    lr: float = 1e-3  # AdamW learning rate (seed)
    max_epochs: int = 200  # epoch cap (seed)
    patience: int = 5  # epochs without val-RMSE improvement before stopping (seed)
    code_states: int = 256  # real val states each vq code is decoded on to find its mean action
    workers: int = -1  # loader processes rendering frames (pixel tokens without a cache); -1 = one per CPU core
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    seed: int = 0  # seeds pair sampling, init and shuffling (seed: 0)
    dino_weights: str = ""  # DINOv2 weights PATH or "random"; "" = the run's own (pixel tokens only)

    def __post_init__(self):
        data.check_choices(self)
        require(self.run, "--run RUN is required: a run folder written by train.py")
        require(min(self.pairs, self.val_pairs, self.batch_size, self.max_epochs, self.patience, self.code_states,
                    self.ensemble) >= 1, "--pairs, --val-pairs, --batch-size, --max-epochs, --patience, --code-states "
                "and --ensemble must be >= 1")
        data.unused(self, ("ensemble", "unlabelled") if self.head == "decoder" else (), "--head decoder")
        require(self.lr > 0 and min(self.workers, self.unlabelled) >= -1, "--lr > 0; --workers, --unlabelled >= -1")


# Shapes: B batch, N pairs, P tokens/frame, D token width, L/C latent width, A macro action (10), F frameskip, K codes.
FEAT = 128  # width of the pooled-state projection (seed MacroActionDecoderStd dec_dim)
HID = 256  # MLP width (seed MacroActionDecoderStd hid)


def macro_px(a_norm, stats):
    """Normalised macro actions (N, A) -> px offsets (N, F, 2) with the run's stored action statistics."""
    return data.macro_to_env(a_norm[:, None].cpu().float(), stats["action_mean"], stats["action_std"])  # (N, F, 2)


def draw_codes(steps_px, usage, title, cols=8, cell=150):
    """Grid picture, one cell per code: steps_px (K, F, 2) mean offsets per env step, drawn from the cell centre as a
    polyline through their running sums and an arrow to their total; world axes (x right, y down), one scale."""
    K, F_ = steps_px.shape[:2]
    path = np.cumsum(steps_px, 1)  # (K, F, 2)
    rows, head = math.ceil(K / cols), 60
    scale = 0.32 * cell / max(np.abs(path).max(), 1e-6)  # image px per world px
    img = np.full((head + rows * cell, cols * cell, 3), 255, np.uint8)  # BGR
    put = lambda text, xy, size=0.42, colour=(0, 0, 0): cv2.putText(  # noqa: E731
        img, text, xy, cv2.FONT_HERSHEY_SIMPLEX, size, colour, 1, cv2.LINE_AA)
    put(title, (8, 24), 0.6)
    put(f"arrow = sum of the {F_} env-step offsets, thin line = their running sum; 50 world px = {50 * scale:.0f} "
        "image px; grey = unused code", (8, 48), 0.45, (60, 60, 60))
    for k in range(K):
        x0, y0 = (k % cols) * cell, head + (k // cols) * cell
        c = np.array([x0 + cell / 2, y0 + cell / 2 + 4])  # (2,) arrow start
        colour = (160, 160, 160) if usage[k] == 0 else (200, 80, 30)
        cv2.rectangle(img, (x0, y0), (x0 + cell - 1, y0 + cell - 1), (220, 220, 220), 1)
        pts = np.vstack([c, c + path[k] * scale]).round().astype(np.int32)  # (F+1, 2)
        cv2.polylines(img, [pts], False, colour, 1, cv2.LINE_AA)
        cv2.arrowedLine(img, tuple(map(int, pts[0])), tuple(map(int, pts[-1])), colour, 2, cv2.LINE_AA, tipLength=0.25)
        cv2.circle(img, tuple(map(int, pts[0])), 3, (0, 0, 0), -1)
        put(f"code {k}  n={int(usage[k])}", (x0 + 6, y0 + 16))
        put(f"|sum| {np.linalg.norm(path[k, -1]):.0f} px", (x0 + 6, y0 + cell - 8), 0.4, (80, 80, 80))
    return img


class ActionDecoder(nn.Module):
    """(P_t, z) -> normalised macro action: the seed's MacroActionDecoderStd as its README runs it (no Delta input)."""

    def __init__(self, visual_dim=384, latent_dim=32, action_dim=10, norm=True):
        super().__init__()
        self.norm = nn.LayerNorm(visual_dim, elementwise_affine=False) if norm else nn.Identity()  # seed: F.layer_norm
        # One learned query pools the 196 patch tokens into one state vector (seed: randn * 0.02).
        self.query = nn.Parameter(torch.randn(visual_dim) * 0.02)
        self.proj_e = nn.Sequential(nn.Linear(visual_dim, HID), nn.GELU(), nn.Linear(HID, FEAT))
        # The disabled Delta branch is a learned constant, so the head's input width stays 128 + 128 + L (seed).
        self.d_const = nn.Parameter(torch.zeros(FEAT))
        self.head = nn.Sequential(nn.LayerNorm(2 * FEAT + latent_dim), nn.Linear(2 * FEAT + latent_dim, HID), nn.GELU(),
                                  nn.Linear(HID, HID), nn.GELU(), nn.Linear(HID, action_dim))  # no output bound (seed)

    def pool(self, p):
        """Attention pooling with the learned query: (B, P, D) -> (B, D)."""
        w = torch.softmax(p @ self.query / math.sqrt(p.shape[-1]), dim=1)  # (B, P)
        return (w.unsqueeze(-1) * p).sum(1)  # (B, D)

    def forward(self, p_t, z):
        """p_t (B, P, D), z (B, L) -> (B, A)."""
        e = self.pool(p_t)  # (B, D)
        f_e = self.proj_e(self.norm(e))  # (B, FEAT)
        return self.head(torch.cat([f_e, self.d_const.expand(len(e), -1), z], -1))  # (B, A)


class ActionAdapter(nn.Module):
    """g(P_t, a_t) -> the conditioning a label-free predictor saw: the planner searches real actions and imagines each
    step through g, so it cannot leave the latents the IDM produces, and needs no decoder. The decoder's net with
    latent and action swapped, on tokens standardised per channel (a LayerNorm drops a state token's mean and scale);
    la regresses the z-scored latent, vq classifies the code; an ensemble averages nets, whose errors partly cancel."""

    def __init__(self, visual_dim=384, action_dim=10, cond_dim=32, num_codes=0, ensemble=1):
        super().__init__()
        self.nets = nn.ModuleList(ActionDecoder(visual_dim, action_dim, num_codes or cond_dim, norm=False)
                                  for _ in range(ensemble))
        self.register_buffer("token_mean", torch.zeros(visual_dim))  # (D,) of the fitting pairs' tokens (decode.py)
        self.register_buffer("token_std", torch.ones(visual_dim))  # (D,)
        self.register_buffer("mean", torch.zeros(cond_dim))  # (C,) la: the IDM's latent statistics (train.py)
        self.register_buffer("std", torch.ones(cond_dim))  # (C,)
        self.register_buffer("codebook", torch.zeros(num_codes, cond_dim))  # (K, C) vq: the world model's codes

    def raw(self, p, a, nets=None):
        """The nets' (or a subset's) mean output: (B, C) z-scored latent, or (B, K) code logits."""
        p = (p - self.token_mean) / self.token_std  # (B, P, D)
        return torch.stack([net(p, a) for net in nets or self.nets]).mean(0)

    def forward(self, p, a):
        """p (B, P, D) tokens, a (B, A) normalised macro action -> (B, C): la the latent, vq its likeliest code."""
        out = self.raw(p, a)  # (B, C) z-scored latent, or (B, K) code logits
        return self.codebook[out.argmax(-1)] if len(self.codebook) else self.mean + self.std * out


HEADS = {"decoder": (ActionDecoder, "decoder.pt", "decode.json"),
         "adapter": (ActionAdapter, "adapter.pt", "adapter.json")}


def load_head(run, ckpt, device, head="decoder"):
    """RUN/{decoder,adapter}.pt -> (the module in eval mode, its fit report); refuses one fitted for another ckpt.pt."""
    cls, name, _ = HEADS[head]
    path, command = Path(run) / name, f"`python decode.py --run {run} --head {head}`"
    saved = data.load_pt(path, f"fit it with {command}")
    require(saved.get("wm_ckpt_id") == ckpt["ckpt_id"], f"{path} was fitted for world-model checkpoint "
            f"{saved.get('wm_ckpt_id')}, but {run}/ckpt.pt is now {ckpt['ckpt_id']} (retrained?); rerun {command}")
    kind = saved["config"].get("decode", {}).get("head", "decoder")  # a file renamed by hand holds the other head
    require(kind == head, f"{path} holds the {kind}, not the {head}; refit it with {command}")
    arch = dict(saved["config"]["arch"])  # a decoder of an earlier version may name the removed Delta branch
    require(not arch.pop("use_delta", False), f"{path} feeds the removed Delta branch (--use-delta); refit it")
    require(head == "decoder" or "token_std" in saved["model"], f"{path} was written by an earlier decode.py; refit it")
    module = cls(**arch).to(device)
    module.load_state_dict(saved["model"])
    return module.eval(), saved["report"]


@torch.no_grad()
def build_pairs(model, ds, n, input_of, cfg, ctx, device, generator, store, unlabelled=0):
    """Label n random windows of ds with the frozen world model -> dict of tensors: p (N, P, D) fp16 real tokens of
    frame t, on `store`; z (N, C) the conditioning the predictor saw (pre-VQ latent for la, codebook vector for vq);
    y (N, A) the true normalised macro action between frame t and t+5 (NaN in the last `unlabelled` rows: their
    labels stay unread); dp (N, D) the patch-mean token change P_t+5 - P_t; codes (N,) for vq. All but p on the CPU."""
    idx = torch.randperm(len(ds), generator=generator)[:n].tolist()
    loader = data.loader(ds, 64, idx, cfg.workers, device)  # 64 windows per world-model batch
    p = torch.empty(len(idx), model.cfg.num_patches, model.cfg.visual_dim, dtype=torch.float16, device=store)
    rows, i, t0 = {"z": [], "y": [], "dp": [], "codes": []}, 0, time.time()
    for batch in tqdm(loader, desc="labelling pairs", leave=False, disable=None):
        with ctx:
            v = model.encode(input_of(batch))  # (B, 2, P, D)
            c = model.conditioning(v)  # la/vq: the IDM on (o_t, o_t+5), T = 2 as in training
        p[i:i + len(v)] = v[:, 0].to(store)  # (B, P, D) fp16
        rows["z"].append(c["cond"][:, 0].float().cpu())  # (B, C) a_0, the real transition (the seed's shift convention)
        rows["y"].append(batch["action"][:, 0].float())  # (B, A) row 0: the actions between frame 0 and frame 1
        rows["dp"].append((v[:, 1] - v[:, 0]).float().mean(1).cpu())  # (B, D)
        rows["codes"] += [c["codes"][:, 0].cpu()] if "codes" in c else []  # (B,)
        i += len(v)
    print(f"labelled {i} pairs in {time.time() - t0:.1f} s ({i / (time.time() - t0 + 1e-9):.0f} pairs/s)")
    pairs = {"p": p, **{k: torch.cat(v) for k, v in rows.items() if v}}
    pairs["y"][len(idx) - unlabelled:] = math.nan  # (N, A) the unlabelled windows' actions: never used
    return pairs


def take(pairs, idx, device):
    """Pairs at idx -> dict of (B, ...) on device, gathered where stored (tokens: GPU or host RAM), tokens float32."""
    return {k: v[idx.to(v.device)].to(device).float() if k == "p" else v[idx].to(device) for k, v in pairs.items()}


@torch.no_grad()
def predict(net, pairs, device, fwd, batch_size=256):
    """net's output for every pair -> (N, ...) fp32 on the CPU."""
    net.eval()
    return torch.cat([fwd(net, take(pairs, idx, device)).float().cpu()
                      for idx in torch.arange(len(pairs["y"])).split(batch_size)])


def fit(net, train, val, cfg, device, generator, fwd, loss_fn, score):
    """AdamW on loss_fn(fwd(net, batch), batch), early stopping on score(predict(val), val) (lower is better), the best
    weights restored (seed train_action_decoder.py) -> the per-epoch history [{"epoch", "train_loss", "val"}]."""
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)  # the seed's: no weight decay
    best, best_state, bad, history = float("inf"), None, 0, []
    for epoch in range(1, cfg.max_epochs + 1):
        t0, total = time.time(), torch.zeros((), device=device)
        net.train()
        for idx in torch.randperm(len(train["y"]), generator=generator).split(cfg.batch_size):
            b = take(train, idx, device)
            loss = loss_fn(fwd(net, b), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        val_score = score(predict(net, val, device, fwd), val).item()
        history.append({"epoch": epoch, "train_loss": total.item() / len(train["y"]), "val": val_score})
        print(f"epoch {epoch:3d} | train loss {history[-1]['train_loss']:.4f} | val {val_score:.4f} | best "
              f"{min(best, val_score):.4f} | {len(train['y']) / (time.time() - t0):.0f} pairs/s")
        bad = 0 if val_score < best - 1e-4 else bad + 1  # improved by the seed's min_delta 1e-4 (normalised units)?
        if not bad:
            best, best_state = val_score, copy.deepcopy(net.state_dict())
        elif bad >= cfg.patience:
            break
    require(best_state is not None, f"no epoch reached a finite validation score (--lr {cfg.lr} too large?): lower it")
    net.load_state_dict(best_state)  # IMPORTANT: the best epoch, not the last (which overfit by construction)
    return history


def main(cfg: DecodeConfig):
    # --- setup: the frozen world model of the run; the baseline has nothing to decode or adapt
    device, ctx = data.setup(cfg.device, cfg.seed)
    model, ckpt, root = wm.load_run(cfg.run, device, cfg.data, cfg.dino_weights)
    mc, run, stats = model.cfg, Path(cfg.run), ckpt["stats"]
    require(mc.variant != "baseline" or cfg.head == "decoder", f"--head adapter: {run} is a baseline run, which plans "
            "real actions already; adapters are for la and vq runs")
    if mc.variant == "baseline":
        print(f"{run}: variant baseline plans real actions; there is no latent action to decode. Nothing written.")
        return None
    gen = torch.Generator().manual_seed(cfg.seed)
    with data.locked(run):
        # --- data: labelled pairs from the frozen world model, split by episode through the dataset's splits
        weights = wm.run_dino_weights(ckpt, cfg.dino_weights)
        input_of = dino.make_input(mc, device, weights)
        ds = {s: dino.windows(mc, root, s, 2, weights) for s in ("train", "val")}
        n_train, n_val = min(cfg.pairs, len(ds["train"])), min(cfg.val_pairs, len(ds["val"]))
        n_unl = len(ds["train"]) - n_train if cfg.unlabelled < 0 else min(cfg.unlabelled, len(ds["train"]) - n_train)
        # The token store (150 KB per pair at P 196, D 384 in fp16: 16.5 GB for the seed's 110k pairs) stays on the
        # GPU when it takes under half of the free memory, which saves a host gather and copy per batch.
        need = (n_train + n_unl + n_val) * mc.num_patches * mc.visual_dim * 2
        fits = device.type == "cuda" and need < 0.5 * torch.cuda.mem_get_info(device)[0]
        store = device if fits else torch.device("cpu")
        print(f"pair token store: {need / 1e9:.3f} GB on {store}")
        train = build_pairs(model, ds["train"], n_train + n_unl, input_of, cfg, ctx, device, gen, store, n_unl)
        val = build_pairs(model, ds["val"], n_val, input_of, cfg, ctx, device, gen, store)
        # Every labelled transition counts, the val pairs of early stopping too: that is what the head cost in labels.
        budget = {"train_pairs": n_train, "val_pairs": len(val["y"]), "requested_train_pairs": cfg.pairs,
                  "labels": n_train + len(val["y"]), "unlabelled": n_unl}
        print(f"label budget: {budget['labels']} labelled transitions ({n_train} train + {len(val['y'])} val)")

        # --- model and objective. decoder: Huber on normalised actions, val RMSE (seed); la adapter: MSE on the
        # z-scored latent; vq adapter: cross-entropy over the codes. fwd(net, batch) -> out; loss(out, batch) -> ()
        huber = lambda out, b: F.smooth_l1_loss(out, b["y"])  # noqa: E731
        rmse = lambda out, b: (out - b["y"]).pow(2).mean().sqrt()  # noqa: E731  val RMSE
        if cfg.head == "decoder":
            arch = dict(visual_dim=mc.visual_dim, latent_dim=mc.cond_dim, action_dim=mc.action_dim)
            head = ActionDecoder(**arch).to(device)
            nets, fwd, loss_fn, score = [head], lambda net, b: net(b["p"], b["z"]), huber, rmse  # noqa: E731
        else:
            arch = dict(visual_dim=mc.visual_dim, action_dim=mc.action_dim, cond_dim=mc.cond_dim,
                        num_codes=mc.num_codes if mc.variant == "vq" else 0, ensemble=cfg.ensemble)
            head = ActionAdapter(**arch).to(device)
            tokens = train["p"][:1000].float().flatten(0, 1)  # (1000 P, D) of the random train pairs
            head.token_mean.copy_(tokens.mean(0)), head.token_std.copy_(tokens.std(0).clamp_min(1e-6))
            if mc.variant == "vq":
                head.codebook.copy_(model.quantizer.embedding)
                loss_fn = score = lambda out, b: F.cross_entropy(out, b["codes"])  # noqa: E731  the IDM's code
            else:
                head.mean.copy_(torch.tensor(stats["latent_mean"])), head.std.copy_(torch.tensor(stats["latent_std"]))
                for pairs in (train, val):  # the target: the IDM's latent, z-scored with the run's statistics
                    pairs["zn"] = (pairs["z"] - head.mean.cpu()) / head.std.cpu()  # (N, C)
                loss_fn = score = lambda out, b: (out - b["zn"]).pow(2).mean()  # noqa: E731
            nets, fwd = head.nets, lambda net, b: head.raw(b["p"], b["y"], [net])  # noqa: E731
        if n_unl:  # pseudo-labels: an inverse model, the decoder's net with the standardised token change as its
            # latent, fitted on the labelled pairs as a decoder is, infers the actions of the unlabelled windows
            dp = train["dp"][:n_train]
            dp_mean, dp_std = dp.mean(0).to(device), dp.std(0).clamp_min(1e-6).to(device)  # (D,)
            inverse = ActionDecoder(mc.visual_dim, mc.visual_dim, mc.action_dim, norm=False).to(device)
            inverse_fwd = lambda net, b: net((b["p"] - head.token_mean) / head.token_std,  # noqa: E731
                                             (b["dp"] - dp_mean) / dp_std)
            fit(inverse, {k: v[:n_train] for k, v in train.items()}, val, cfg, device, gen, inverse_fwd, huber, rmse)
            train["y"][n_train:] = predict(inverse, {k: v[n_train:] for k, v in train.items()}, device, inverse_fwd)
            inverse_rmse = rmse(predict(inverse, val, device, inverse_fwd), val).item()
            print(f"inverse model: val RMSE {inverse_rmse:.4f} (normalised actions); it labelled {n_unl} windows")

        # --- fit each net (an ensemble: the same pairs, its own init and order), early stopping on the val score
        t0 = time.time()
        histories = [fit(net, train, val, cfg, device, gen, fwd, loss_fn, score) for net in nets]
        history = histories[0]  # the report's curve is the first net's; members_val: each net's best
        # (N, A) actions, (N, C) z-scored latents or (N, K) code logits; an ensemble's are its nets' mean
        out = predict(head, val, device, fwd if cfg.head == "decoder" else lambda h, b: h.raw(b["p"], b["y"]))
        report = {"run": str(run), "variant": mc.variant, "tokens": mc.tokens, "head": cfg.head, "label_budget": budget,
                  "labels": budget["labels"], "epochs": len(history),
                  "best_epoch": min(history, key=lambda h: h["val"])["epoch"], "val": score(out, val).item(),
                  "members_val": [min(h["val"] for h in hs) for hs in histories], "train_seconds": time.time() - t0,
                  "history": history, **({"inverse_val_rmse": inverse_rmse} if n_unl else {})}
        if cfg.head == "decoder":  # val RMSE (normalised; px per env step, overall and per axis) and R^2 per dim
            err_px, r2 = macro_px(out, stats) - macro_px(val["y"], stats), wm.r2(out, val["y"])  # (N, F, 2), (A,)
            report.update(val_rmse_norm=report["val"], val_rmse_px=err_px.pow(2).mean().sqrt().item(),
                          val_rmse_px_xy=err_px.pow(2).mean((0, 1)).sqrt().tolist(), r2_per_dim=r2.tolist(),
                          r2_mean=r2.mean().item())
            print(f"val RMSE {report['val_rmse_px']:.2f} px per env step (x, y: {report['val_rmse_px_xy'][0]:.2f}, "
                  f"{report['val_rmse_px_xy'][1]:.2f}); R^2 mean {report['r2_mean']:.3f}; per dim "
                  + " ".join(f"{r:.2f}" for r in report["r2_per_dim"]))
        elif mc.variant == "vq":
            report["val_accuracy"] = (out.argmax(-1) == val["codes"]).float().mean().item()
            print(f"adapter: val cross-entropy {report['val']:.4f}, the IDM's code predicted for "
                  f"{report['val_accuracy']:.1%} of val transitions ({mc.num_codes} codes)")
        else:
            print(f"adapter: val MSE {report['val']:.4f} of the z-scored latent (1 = predicting its mean)" + (
                f"; each net alone: {', '.join(f'{v:.4f}' for v in report['members_val'])}" if len(nets) > 1 else ""))

        # --- write; for a vq decoder also what each code means (decoded on the same real val states, averaged)
        files = [run / HEADS[cfg.head][1], run / HEADS[cfg.head][2]]
        if mc.variant == "vq" and cfg.head == "decoder":
            with torch.no_grad():
                p = val["p"][:cfg.code_states].to(device).float()  # (N, P, D)
                steps = macro_px(torch.stack([head(p, e.expand(len(p), -1)).mean(0)
                                              for e in model.quantizer.embedding]), stats)  # (K, F, 2)
            usage = torch.bincount(val["codes"], minlength=len(steps))  # (K,)
            report["codes"] = [{"code": k, "usage": int(usage[k]), "mean_action_px": steps[k].tolist(),
                                "sum_px": steps[k].sum(0).tolist()} for k in range(len(steps))]
            title = f"{run.name}: mean decoded push per code ({len(steps)} codes, usage over {len(val['y'])} val pairs)"
            data.write_png(run / "codes.png", draw_codes(steps.numpy(), usage.numpy(), title))
            files.append(run / "codes.png")
        data.atomic_write(files[0], {"model": head.state_dict(), "wm_ckpt_id": ckpt["ckpt_id"],
                                     "config": {"arch": arch, "decode": asdict(cfg)}, "report": report})
        data.atomic_write(files[1], report)
    print("wrote " + ", ".join(map(str, files)))
    return report


if __name__ == "__main__":
    data.cli(main, DecodeConfig, doc=__doc__)
