"""The learned adaptor, trained at the test budget, against the identity adaptor on held-out prompts."""

from __future__ import annotations

import json

from cw_export.distill.evaluate import evaluate_checkpoint


def test_learned_adaptor_halves_r_out_error_and_raises_psnr(tiny_model, trained_checkpoint):
    report = evaluate_checkpoint(tiny_model, trained_checkpoint, num_prompts=8)
    json.dumps(report)  # the report is JSON
    methods = report["methods"]
    assert report["adaptor_steps"] == [1, 3, 5, 7]
    assert methods["full"]["r_out_mse_teacher_forced"] == 0.0
    identity, learned = methods["identity"], methods["learned"]
    assert identity["r_out_mse_teacher_forced"] >= 2 * learned["r_out_mse_teacher_forced"], report["summary"]
    assert identity["r_out_mse_rollout"] >= 2 * learned["r_out_mse_rollout"], report["summary"]
    assert learned["final_latent_psnr_db"] > identity["final_latent_psnr_db"], report["summary"]
    assert report["settings"]["prompts"] == "heldout" and report["settings"]["num_prompts"] == 8
