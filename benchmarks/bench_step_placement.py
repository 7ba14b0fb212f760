"""Where the sampler's steps sit: does a last step at a high ᾱ make the members differ where the model is unsure?

Issue 17 asks for members that disagree (variance ≥ 1e-3 near the tumour) where errors are, from stochastic
sampling. With the default trailing spacing, K = 2 puts the two steps at t = 999 and 499 (ᾱ ≈ 0.08), where the
noise of η = 1 hardly reaches the x0 estimate. This benchmark samples a trained checkpoint with **explicit**
timesteps (any decreasing list, each step a DDIM step with η from the checkpoint straight to the next listed t,
written here and not in the package) and reports, on the labelled cases of a manifest's subset, exactly what
``diagnose`` reports for members: mean Dice, member variance in the whole tumour dilated 3 voxels, and the AUROC
of entropy and of variance for the errors (``audit.probe.member_summary``). The first row is the product's own
sampler, the second the same timesteps through this benchmark's step (they must agree to the last digit: the check
that the re-implemented step is MONAI's).

    .venv/bin/python -m benchmarks.bench_step_placement demo_out/runs/diffusion/best.pt demo_out/data/manifest.json \\
        --timesteps 999,499 999,199 999,99 999,499,99

About 10 s per row for the demo's 6 held-out cases on 2 CPU cores. Results: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from medseg_diff.audit.cases import case_records, load_case
from medseg_diff.audit.probe import DiffusionProbe, member_summary
from medseg_diff.audit.windows import Windowing
from medseg_diff.inference.loading import load_model
from medseg_diff.runtime import pin_reproducibility


class ExplicitSteps:
    """A scheduler's stand-in for ``DDIMSampler``: ``set_timesteps`` gives ``timesteps`` (decreasing, any spacing)
    and ``step`` is DDIM's (Song et al. 2021, eq. 12 and 16; prediction "sample") from each to the next listed t
    (the last to the clean mask, ᾱ = 1). Everything else is the wrapped scheduler's."""

    def __init__(self, scheduler, timesteps: list[int]):
        if scheduler.prediction_type != "sample":
            raise ValueError("explicit timesteps are written for x0 prediction only")
        if sorted(set(timesteps), reverse=True) != list(timesteps) or timesteps[-1] < 0 or \
                timesteps[0] >= scheduler.num_train_timesteps:
            raise ValueError(f"timesteps must decrease within 0..{scheduler.num_train_timesteps - 1}: {timesteps}")
        self._base, self._list = scheduler, [int(t) for t in timesteps]
        self._next = {t: (self._list[i + 1] if i + 1 < len(self._list) else -1) for i, t in enumerate(self._list)}

    def __getattr__(self, name):
        return getattr(self._base, name)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.timesteps = torch.tensor(self._list, dtype=torch.long, device=device)

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None):
        t, prev = int(timestep), self._next[int(timestep)]
        alphas = self._base.alphas_cumprod
        a_t = alphas[t]
        a_prev = alphas[prev] if prev >= 0 else self._base.final_alpha_cumprod
        x0 = model_output.clamp(-1.0, 1.0)
        eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp_min(0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + std * torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
                                                device=model_output.device)
        return x_prev, x0


def placement_rows(checkpoint: str, manifest: str, placements: list[list[int] | None], subset: str = "test",
                   ensemble: int | None = None, max_cases: int | None = None) -> list[dict]:
    """One row per placement (None: the product's sampler): mean Dice, variance near the tumour, AUROCs."""
    pin_reproducibility()
    device = torch.device("cpu")
    model = load_model(checkpoint, device, seed=None)
    _, convention, records = case_records(manifest, subset, 0, None, max_cases)
    cases = [load_case(r, convention, model.cfg.data.spacing, device) for r in records]
    probe = DiffusionProbe(model, Windowing.of(model.cfg), int(model.cfg.experiment.seed))
    members = ensemble or probe.default[1]
    product_scheduler = model.adapter.scheduler
    rows = []
    try:
        for timesteps in placements:
            if timesteps is None:
                model.adapter.scheduler = product_scheduler
            else:
                model.adapter.scheduler = lambda ts=timesteps: ExplicitSteps(product_scheduler(), ts)
            summaries = [member_summary(probe.sample(c, prior=probe.own_prior(c), members=True,
                                                     steps=None if timesteps is None else len(timesteps),
                                                     ensemble=members), c, probe.threshold, members)
                         for c in cases]
            rows.append({
                "timesteps": "product" if timesteps is None else ",".join(map(str, timesteps)),
                "alpha_bar_last": None if timesteps is None else float(product_scheduler().alphas_cumprod[timesteps[-1]]),
                "cases": len(cases), "members": members,
                "dice": float(np.mean([s["dice"]["mean"] for s in summaries])),
                "variance_near_tumour": float(np.mean([s["variance_near_tumour"] for s in summaries])),
                "entropy_auroc": float(np.mean([s["entropy_auroc"] for s in summaries])),
                "variance_auroc": float(np.mean([s["variance_auroc"] for s in summaries])),
            })
    finally:
        model.adapter.scheduler = product_scheduler
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| timesteps | ᾱ of the last | mean Dice | member variance near the tumour | entropy AUROC | variance AUROC |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        alpha = "-" if r["alpha_bar_last"] is None else f"{r['alpha_bar_last']:.2f}"
        lines.append(f"| {r['timesteps']} | {alpha} | {r['dice']:.4f} | {r['variance_near_tumour']:.2e} | "
                     f"{r['entropy_auroc']:.3f} | {r['variance_auroc']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("manifest")
    p.add_argument("--timesteps", nargs="+", default=["999,499", "999,199", "999,99", "999,499,99"],
                   help="comma-separated decreasing timesteps, one placement each")
    p.add_argument("--subset", default="test")
    p.add_argument("--ensemble", type=int, default=None, help="members (default: the checkpoint's)")
    p.add_argument("--max-cases", type=int, default=None)
    args = p.parse_args(argv)
    placements = [None] + [[int(t) for t in spec.split(",")] for spec in args.timesteps]
    print(markdown(placement_rows(args.checkpoint, args.manifest, placements, args.subset, args.ensemble,
                                  args.max_cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
