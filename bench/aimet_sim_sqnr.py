"""Diagnostic: SQNR of high_res_in under aimet's QuantizationSimModel in torch (W8A16), no ONNX export involved.

Used to split an SQNR loss between "the quantization itself" and "the exported QDQ graph in onnxruntime": at
SD 1.5 size the build measured high_res_in at 13.8 dB in onnxruntime (docs/sd15.md) while this sim gives 40-49 dB.

    python bench/aimet_sim_sqnr.py --model sd15-arch --latent 32

Calibration: unit noise scaled as the sampler scales it, at the even-numbered of 8 DPM++ timesteps (4 samples, batch
2 = [uncond, cond] of one prompt); test: the odd-numbered ones. Prints mean SQNR per output (temb, r_in, skips).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

from cw_export.models.pipeline import load_model
from cw_export.quantize.aimet_backend import SIM_CONFIG, _quiet, _time_features_quantizer, quantizable_scope
from cw_export.reference import make_scheduler, text_embeddings
from cw_export.split import split_unet


def sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).mean() / ((reference - actual) ** 2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--latent", type=int, default=32, help="latent height = width (pixels / 8)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from aimet_torch.quantsim import QuantizationSimModel

    model = load_model(args.model)
    split = split_unet(model.unet)
    graph = split.graph_modules()["high_res_in"]  # takes time features, as exported
    hidden, _ = text_embeddings(model, "a photo of a cat")
    scheduler = make_scheduler(model)
    scheduler.set_timesteps(8)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i, t in enumerate(scheduler.timesteps):
        x = torch.randn((1, 4, args.latent, args.latent), generator=generator)
        x = scheduler.scale_model_input(torch.cat([x, x]) * (scheduler.init_noise_sigma if i == 0 else 1.0), t)
        samples.append((x, split.time_features(torch.full((2,), float(t))), hidden))
    calibration, test = samples[::2], samples[1::2]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as config:
        json.dump(SIM_CONFIG, config)
    with _quiet():
        with quantizable_scope(graph):
            sim = QuantizationSimModel(graph, calibration[0], default_output_bw=16, default_param_bw=8,
                                       config_file=config.name)
        _time_features_quantizer(sim.model)
        sim.compute_encodings(lambda m: [m(*c) for c in calibration])
    per_output: dict[int, list[float]] = {}
    with torch.no_grad():
        for inputs in test:
            for k, (a, b) in enumerate(zip(graph(*inputs), sim.model(*inputs))):
                per_output.setdefault(k, []).append(sqnr(a.numpy(), b.numpy()))
    names = ["temb", "r_in", *[f"skip_{i}" for i in range(len(per_output) - 2)]]
    print(json.dumps({n: round(float(np.mean(v)), 1) for n, v in zip(names, per_output.values())}))


if __name__ == "__main__":
    main()
