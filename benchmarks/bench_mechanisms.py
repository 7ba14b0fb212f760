"""Issue-17 development loop: train one variant with the demo's recipe and data (20 phantoms at 3 mm, seed 0, the
demo's 6 held out) and measure, on the held-out cases at the model's grid (windowed like predict), the mechanism
numbers: mean Dice (TC/WT/ET) of one x0 prediction at alpha-bar ~ 0.9 from the true / inverted / empty mask noised;
the sampler at K1xN1, the config's default and K4xN4; mean member variance in the whole tumour dilated 3 voxels;
entropy and variance AUROC for errors; Dice with a rough-outline prior (models that take one); enrichment and
pointing game of the cross and self maps. One JSON line per run is appended to OUT/results.jsonl.
Overrides apply on top of configs/demo_cpu.yaml as it is now; the runs in benchmarks/README.md were made on the
demo config of commit d384397 (before issue 17) plus the overrides listed there. A quick screen for choosing
defaults; `medseg-diff diagnose` is the full audit and `benchmarks.study` the fair study. A run whose
``OUT/runs/NAME/best.pt`` exists is measured again without training (``--retrain`` trains it anew).

Usage (from the repository root; ``--out`` defaults to ``$OUT``, else /tmp/dev)::

    .venv/bin/python -m benchmarks.bench_mechanisms NAME [--set-style overrides ...] --out /tmp/dev
    .venv/bin/python -m benchmarks.bench_mechanisms v7 diffusion.x_skip=true \
        model.denoiser.token_source=prior loss.attention=0.5 diffusion.eta=1.0 model.denoiser.self_condition=true
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from benchmarks.harness import phantom_manifest, run_config
from medseg_diff.data.manifest import load_manifest
from medseg_diff.data.conventions import get_convention
from medseg_diff.data.dataset import case_record
from medseg_diff.data.transforms import eval_transforms
from medseg_diff.evaluation.run import select_cases
from medseg_diff.evaluation.metrics import dice, uncertainty_auroc, evaluation_mask
from medseg_diff.inference.loading import load_model
from medseg_diff.inference.sliding_window import infer_volume
from medseg_diff.kinds.priors import rough_outline
from medseg_diff.diffusion.sampler import predict_x0
from medseg_diff.audit.scores import enrichment, pointing_game, dilated
from medseg_diff.training.run import train


def data(root: Path) -> Path:
    """The demo's data: 20 phantoms at 3 mm, seed 0, 6 held out (test fraction 0.3)."""
    return phantom_manifest(root / "data", cases=20, held_out=6, spacing=3.0, seed=0, name="synthetic-brats", workers=2)


def run(root: Path, name: str, overrides: list[str], retrain: bool = False) -> None:
    D = root
    m = data(root)
    out = D / "runs" / name
    t0 = time.time()
    if retrain or not (out / "best.pt").exists():
        train(run_config(m, out, ["model.kind=diffusion", *overrides]))
    ttrain = time.time() - t0
    model = load_model(out / "best.pt", "cpu")
    net, cfg = model.net.eval(), model.cfg
    man = load_manifest(m); conv = get_convention(man.convention)
    tf = eval_transforms(conv, cfg.data.spacing, with_label=True)
    roi = cfg.infer.roi_size or cfg.data.roi_size
    sch = model.adapter.scheduler()
    a = sch.alphas_cumprod
    t09 = int((a - 0.9).abs().argmin())
    res = {k: [] for k in ["xt_true", "xt_inv", "xt_empty", "k1n1", "default", "k4n4", "var_wt", "auroc_ent", "auroc_var", "outline", "cross_enr", "cross_pt", "self_enr", "self_pt"]}
    cases = select_cases(man, "test")
    for case in cases:
        d = tf(case_record(man, case))
        img = d["image"].as_tensor()[None].float(); reg = d["label"].as_tensor()[None].float()
        gt = reg[0].numpy() > 0.5
        head = (img[0] != 0).any(0).numpy()
        def md(p): 
            m_ = (p > 0.5) & head
            return float(np.mean([dice(m_[r], gt[r]) for r in range(3)]))
        # x_t test, windowed
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(reg.shape, generator=g)
        for key, x0 in [("xt_true", reg * 2 - 1), ("xt_inv", 1 - reg * 2), ("xt_empty", -torch.ones_like(reg))]:
            xt = sch.add_noise(x0, noise, torch.tensor([t09]))
            def pred(w):
                c = net.encode(w[:, :4])
                return (predict_x0(net, sch, w[:, 4:], torch.full((w.shape[0],), t09), c) + 1) / 2
            with torch.no_grad():
                p = sliding_window_inference(torch.cat([img, xt], 1), roi, 2, pred, overlap=0.25, mode="gaussian")
            res[key].append(md(p[0].numpy()))
        d_ = cfg.diffusion
        for key, k, n in [("k1n1", 1, 1), ("default", d_.sample_steps, d_.ensemble), ("k4n4", 4, 4)]:
            if d_.mode == "direct" and key != "default":
                continue
            seg = model.adapter.segmenter(net)
            seg.sampler.steps, seg.sampler.ensemble = k, n
            for item in filter(None, os.environ.get("SAMPLER_SET", "").split(",")):  # e.g. members=bernoulli,eta=0
                attr, value = item.split("=")
                setattr(seg.sampler, attr, type(getattr(seg.sampler, attr))(value))
            seg.attention = key == "default"
            with torch.no_grad():
                v = infer_volume(seg, img, roi, overlap=cfg.infer.overlap, sw_batch_size=2)
            p = v.probs.numpy()
            res[key].append(md(p))
            if key == "default":
                wt3 = dilated(gt[1], 3)
                res["var_wt"].append(float(v.variance[0].numpy()[wt3].mean()) if v.variance is not None else 0.0)
                err = ((p > 0.5) & head) != gt
                em = evaluation_mask((p > 0.5) & head, gt)
                res["auroc_ent"].append(uncertainty_auroc(v.entropy[0].numpy(), err.any(0), em.any(0)))
                if v.variance is not None:
                    res["auroc_var"].append(uncertainty_auroc(v.variance[0].numpy(), err.any(0), em.any(0)))
                for kind in ("cross", "self"):
                    if kind in v.attention:
                        mp = v.attention[kind][0].numpy()
                        res[f"{kind}_enr"].append(enrichment(mp, wt3, head)); res[f"{kind}_pt"].append(pointing_game(mp, wt3, head))
        if model.adapter.optional_prior or model.adapter.external_prior:
            seg = model.adapter.segmenter(net); seg.attention = False
            prior = rough_outline(reg, 2, 1)
            with torch.no_grad():
                v = infer_volume(seg, img, roi, overlap=cfg.infer.overlap, sw_batch_size=2, prior=prior)
            res["outline"].append(md(v.probs.numpy()))
    summ = {k: (float(np.nanmean(v)) if v else None) for k, v in res.items()}
    summ["train_s"] = ttrain
    summ["params"] = sum(p.numel() for p in net.parameters())
    label = f"{name}[{os.environ['SAMPLER_SET']}]" if os.environ.get("SAMPLER_SET") else name
    print(label, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summ.items()}), flush=True)
    (D / "results.jsonl").open("a").write(json.dumps({"name": label, "overrides": overrides, **summ}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the run's name: OUT/runs/NAME")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides on configs/demo_cpu.yaml")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/dev")))
    p.add_argument("--retrain", action="store_true", help="train even when OUT/runs/NAME/best.pt exists")
    args = p.parse_args(argv)
    run(args.out, args.name, args.overrides, args.retrain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
