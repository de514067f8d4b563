"""cw_export.runtime.schedulers against diffusers 0.42's schedulers, which it ports.

Each trajectory test runs one deterministic fake model through diffusers' scheduler (torch, float64 tensors) and through
the numpy step table, from the same initial noise, and compares the final samples. diffusers keeps its betas, sigmas and
(Euler, DPM-Solver++) the sample inside ``step`` in float32, while the table is built in float64, so the two agree to
float32 rounding, not bit for bit. Tolerance: RTOL = 1e-5 on max|ours - diffusers| / max|diffusers| for float64 and
float32 samples alike (measured on x86_64: at most 8.3e-7 over all cases here). alphas_cumprod matches diffusers
bit for bit on that machine (checked at rtol 1e-6), and timesteps must match exactly.
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cw_export.errors import CwExportError, SchedulerConfigError
from cw_export.runtime import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# diffusers 0.42 calls np.array on a torch tensor with copy=False (its own deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RTOL = 1e-5  # relative max abs diff, float64 paths (see module docstring)
RTOL_FLOAT32 = 1e-5  # float32 samples in and out on both sides (measured: about 2e-7)
STEP_COUNTS = [1, 2, 4, 8, 20, 25]
REPO = Path(__file__).resolve().parents[2]

CLASSES = {
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "ddim": diffusers.DDIMScheduler,
}
# clip_sample=False is needed by ddim (DDIMScheduler's default clips x0, which the runtime refuses); the other two
# samplers ignore it, as diffusers' from_config does.
BUILTIN = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0, "solver_order": 2,
           "clip_sample": False}
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
        "timestep_spacing": "leading"}
CONFIGS = {
    "builtin": BUILTIN,
    "sd15": SD15,
    "trailing": {**BUILTIN, "timestep_spacing": "trailing"},
    "v_prediction": {**BUILTIN, "prediction_type": "v_prediction"},
    # SD 1.5's file as shipped: no timestep_spacing, so each class's own default applies (ddim: leading)
    "sd15_verbatim": {k: v for k, v in SD15.items() if k != "timestep_spacing"},
    "v_leading_linear": {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                         "prediction_type": "v_prediction"},
    "cosine": {**BUILTIN, "beta_schedule": "squaredcos_cap_v2"},
}
EXTRA = [  # sampler-specific options
    ("dpmpp_2m", {**BUILTIN, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {**BUILTIN, "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_2m", {**BUILTIN, "final_sigmas_type": "sigma_min", "euler_at_final": True}),
    ("dpmpp_2m", {**BUILTIN, "solver_order": 1}),
    ("dpmpp_2m", {**SD15, "solver_type": "bh2"}),  # a UniPC config: diffusers maps its solver_type to midpoint
    ("euler", {**BUILTIN, "final_sigmas_type": "sigma_min"}),
    ("euler", {**SD15, "prediction_type": "v_prediction", "timestep_type": "discrete"}),
    ("ddim", {**BUILTIN, "set_alpha_to_one": True}),
    ("ddim", {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
]


def _fake_model(sample: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in for a UNet: depends on both the sample and the timestep."""
    direction = np.random.default_rng(7).standard_normal(sample.shape)
    return (0.3 * sample + math.sin(float(t) / 100.0) * direction).astype(sample.dtype)


def _noise(dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(dtype)


def _diffusers_scheduler(sampler: str, config: dict, n: int):
    scheduler = CLASSES[sampler].from_config(config)
    scheduler.set_timesteps(n)
    return scheduler


def _run_diffusers(sampler: str, config: dict, n: int, noise: np.ndarray) -> np.ndarray:
    scheduler = _diffusers_scheduler(sampler, config, n)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        model_output = torch.from_numpy(_fake_model(model_input.numpy(), t.item()))
        x = scheduler.step(model_output, t, x).prev_sample.to(model_output.dtype)
    return x.numpy()


def _run_table(table: dict, noise: np.ndarray) -> np.ndarray:
    x = noise * noise.dtype.type(S.init_noise_sigma(table))
    state: dict = {}
    for i, t in enumerate(table["timesteps"]):
        model_output = _fake_model(S.scale_model_input(table, i, x), t)
        x = S.sampler_step(table, i, model_output, x, state)
        assert x.dtype == noise.dtype
    return x


def _rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


CASES = [(s, name, cfg) for s in CLASSES for name, cfg in CONFIGS.items()]
CASE_IDS = [f"{s}-{name}" for s, name, _ in CASES]


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize(("sampler", "name", "config"), CASES, ids=CASE_IDS)
def test_timesteps_equal_diffusers(sampler, name, config, n):
    table = S.build_step_table(sampler, config, n)
    expected = _diffusers_scheduler(sampler, config, n).timesteps
    assert table["timesteps"] == expected.tolist()
    assert table["timesteps_dtype"] == str(expected.dtype).removeprefix("torch.")
    assert table["num_inference_steps"] == n == len(table["c_sample"]) == len(table["sigmas"]) - 1


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize(("sampler", "name", "config"), CASES, ids=CASE_IDS)
def test_trajectory_matches_diffusers(sampler, name, config, n):
    noise = _noise()
    ours = _run_table(S.build_step_table(sampler, config, n), noise)
    assert _rel_diff(ours, _run_diffusers(sampler, config, n, noise)) <= RTOL


@pytest.mark.parametrize("n", [1, 4, 8, 20])
@pytest.mark.parametrize(("sampler", "config"), EXTRA, ids=[f"{s}-{i}" for i, (s, _) in enumerate(EXTRA)])
def test_sampler_options_match_diffusers(sampler, config, n):
    noise = _noise()
    table = S.build_step_table(sampler, config, n)
    assert table["timesteps"] == _diffusers_scheduler(sampler, config, n).timesteps.tolist()
    assert _rel_diff(_run_table(table, noise), _run_diffusers(sampler, config, n, noise)) <= RTOL


@pytest.mark.parametrize("sampler", CLASSES)
def test_float32_samples_stay_float32_and_match(sampler):
    noise = _noise(np.float32)
    ours = _run_table(S.build_step_table(sampler, BUILTIN, 8), noise)
    assert ours.dtype == np.float32
    assert _rel_diff(ours, _run_diffusers(sampler, BUILTIN, 8, noise)) <= RTOL_FLOAT32


@pytest.mark.parametrize("n", [1, 8, 25])
@pytest.mark.parametrize(("sampler", "name", "config"), CASES, ids=CASE_IDS)
def test_init_noise_sigma_and_scale_model_input_match_diffusers(sampler, name, config, n):
    table = S.build_step_table(sampler, config, n)
    scheduler = _diffusers_scheduler(sampler, config, n)
    assert S.init_noise_sigma(table) == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)
    sample = _noise()
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.scale_model_input(torch.from_numpy(sample), t).numpy()
        np.testing.assert_allclose(S.scale_model_input(table, i, sample), expected, rtol=1e-6, atol=0)
        scheduler._step_index = i + 1  # what step() would do; scale_model_input reads the step counter
    if sampler != "ddim":
        np.testing.assert_allclose(table["sigmas"], scheduler.sigmas.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "trained"])
def test_alphas_cumprod_matches_diffusers(schedule):
    config = {**BUILTIN, "beta_schedule": schedule}
    if schedule == "trained":
        config["trained_betas"] = np.linspace(0.001, 0.03, 1000).tolist()
    ours = S.alphas_cumprod_from_config(config)
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    # bit-exact on the x86_64 dev machine; 1e-6 leaves room for a torch.linspace built without fused multiply-adds
    np.testing.assert_allclose(ours, diffusers.DDIMScheduler.from_config(config).alphas_cumprod.numpy(), rtol=1e-6)


@pytest.mark.parametrize("sampler", CLASSES)
def test_defaults_are_diffusers_defaults(sampler):
    """The table uses a class default wherever a config leaves a key out, so they must be diffusers' defaults."""
    parameters = inspect.signature(CLASSES[sampler].__init__).parameters
    for key, value in S.SAMPLERS[sampler].defaults.items():
        assert parameters[key].default == value, key
    assert S.SAMPLERS[sampler].diffusers_class == CLASSES[sampler].__name__


@pytest.mark.parametrize("sampler", CLASSES)
def test_json_round_trip_gives_identical_results(sampler):
    table = S.build_step_table(sampler, CONFIGS["sd15"], 8)
    loaded = json.loads(json.dumps(table, allow_nan=False, sort_keys=True))
    assert loaded == table
    np.testing.assert_array_equal(_run_table(loaded, _noise()), _run_table(table, _noise()))
    assert isinstance(table["formula"], str) and "c_x0_prev" in table["formula"]


def test_dpmpp_2m_uses_previous_x0_only_on_second_order_steps():
    table = S.build_step_table("dpmpp_2m", BUILTIN, 8)
    assert table["c_x0_prev"][0] == 0.0 and table["c_x0_prev"][-1] == 0.0  # first order at both ends (final sigma 0)
    assert all(c != 0.0 for c in table["c_x0_prev"][1:-1])
    assert table["sigmas"][-1] == 0.0 and table["input_scale"] == [1.0] * 8


UNSUPPORTED = [
    ("dpmpp_2m", {"use_karras_sigmas": True}),
    ("dpmpp_2m", {"thresholding": True}),
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp_2m", {"algorithm_type": "dpmsolver"}),
    ("dpmpp_2m", {"algorithm_type": "deis"}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_2m", {"solver_order": 3}),
    ("dpmpp_2m", {"solver_order": True}),
    ("dpmpp_2m", {"variance_type": "learned_range"}),
    ("dpmpp_2m", {"lambda_min_clipped": -5.1}),
    ("dpmpp_2m", {"use_lu_lambdas": True}),
    ("dpmpp_2m", {"final_sigmas_type": "denoise_to_zero"}),
    ("dpmpp_2m", {"prediction_type": "sample"}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"interpolation_type": "log_linear"}),
    ("euler", {"prediction_type": "v_prediction", "timestep_type": "continuous"}),
    ("euler", {"prediction_type": "flow_prediction"}),
    ("ddim", {"clip_sample": True}),
    ("ddim", {"thresholding": True}),
    ("ddim", {"timestep_spacing": "karras"}),
    ("euler", {"rescale_betas_zero_snr": True}),
    ("euler", {"beta_schedule": "sigmoid"}),
    ("euler", {"trained_betas": [0.01] * 10}),
    ("euler", {"trained_betas": ["0.01"] * 999 + [None]}),
    ("euler", {"beta_start": "0.00085"}),
    ("ddim", {"beta_end": 1.5}),
    ("euler", {"num_train_timesteps": 0}),
    ("ddim", {"steps_offset": -1}),
]


@pytest.mark.parametrize(("sampler", "change"), UNSUPPORTED, ids=[f"{s}-{sorted(c)[-1]}" for s, c in UNSUPPORTED])
def test_unsupported_options_raise(sampler, change):
    with pytest.raises(SchedulerConfigError) as info:
        S.build_step_table(sampler, {**BUILTIN, **change}, 8)
    message = str(info.value)
    assert "\n" not in message
    assert any(key in message for key in change)  # names the bad option


def test_ddim_without_clip_sample_raises_because_diffusers_would_clip():
    config = {k: v for k, v in BUILTIN.items() if k != "clip_sample"}
    assert diffusers.DDIMScheduler.from_config(config).config.clip_sample is True
    with pytest.raises(SchedulerConfigError, match="clip_sample"):
        S.build_step_table("ddim", config, 8)


@pytest.mark.parametrize(("sampler", "n"), [("lms", 8), ("euler", 0), ("euler", 1001), ("euler", 2.0), ("ddim", True)])
def test_bad_sampler_or_step_count_raises(sampler, n):
    with pytest.raises(SchedulerConfigError) as info:
        S.build_step_table(sampler, BUILTIN, n)
    assert ("dpmpp_2m" in str(info.value)) if sampler == "lms" else ("num_inference_steps" in str(info.value))
    assert issubclass(SchedulerConfigError, CwExportError)


def test_trailing_step_count_with_a_negative_timestep_raises():
    # np.arange(1000, 0, -1000/61) has 62 points; diffusers would then feed timestep -1
    with pytest.raises(SchedulerConfigError, match="num_inference_steps=61"):
        S.build_step_table("ddim", CONFIGS["trailing"], 61)


def test_bad_step_index_and_missing_state_raise():
    table = S.build_step_table("dpmpp_2m", BUILTIN, 4)
    x = _noise()
    with pytest.raises(SchedulerConfigError, match="step_index"):
        S.scale_model_input(table, 4, x)
    with pytest.raises(SchedulerConfigError, match="x0_prev"):
        S.sampler_step(table, 1, x, x, {})


def test_unknown_keys_are_ignored():
    config = {**BUILTIN, "_class_name": "PNDMScheduler", "skip_prk_steps": True, "some_future_key": 1}
    assert S.build_step_table("euler", config, 4) == S.build_step_table("euler", BUILTIN, 4)


_ISOLATION_SCRIPT = """
import sys
BLOCKED = {"torch", "diffusers", "transformers"}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked import of " + name)
        return None
sys.meta_path.insert(0, Blocker())
before = set(sys.modules)
import numpy as np
from cw_export.runtime import schedulers as S
table = S.build_step_table("dpmpp_2m", {"beta_schedule": "scaled_linear"}, 4)
x = np.ones((1, 4, 2, 2), np.float32)
S.sampler_step(table, 0, S.scale_model_input(table, 0, x), x, {})
allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "cw_export"}
extra = sorted({m.split(".")[0] for m in set(sys.modules) - before} - allowed)
assert not extra, extra
print("ok")
"""


def test_module_imports_only_numpy_and_stdlib():
    result = subprocess.run([sys.executable, "-c", _ISOLATION_SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
