"""Samplers as data: DPM-Solver++ 2M, Euler and DDIM reduced to per-step linear coefficients.

Ported from diffusers 0.42 (``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, ``DDIMScheduler``) and checked
against it in ``tests/runtime/test_schedulers.py``. ``build_step_table`` turns a diffusers scheduler config into a
JSON-serialisable table that a bundle's manifest carries, so that an app can run the denoising loop without this module
(or diffusers) by following the table's ``formula``::

    x = init_noise_sigma * noise
    for i, t in enumerate(timesteps):
        model_output = unet(input_scale[i] * x, t)        # after classifier-free guidance
        x0 = x0_c_sample[i] * x + x0_c_model_output[i] * model_output
        x = c_sample[i] * x + c_model_output[i] * model_output + c_x0_prev[i] * x0_prev
        x0_prev = x0

Config options that change the math and are not implemented raise ``SchedulerConfigError`` instead of silently
giving a different trajectory. Only numpy and the standard library are imported here (see ``cw_export.runtime``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import SchedulerConfigError

STEP_TABLE_VERSION = 1
FORMULA = (
    "x = init_noise_sigma * noise; for i in range(num_inference_steps): "
    "model_output = unet(input_scale[i] * x, timesteps[i]) (after guidance); "
    "x0 = x0_c_sample[i] * x + x0_c_model_output[i] * model_output; "
    "x = c_sample[i] * x + c_model_output[i] * model_output + c_x0_prev[i] * x0_prev; "
    "x0_prev = x0 (c_x0_prev[0] is 0, so x0_prev is never read before it is set)"
)

_OFF = (False, None)  # boolean options the runtime supports only when switched off
_COMMON_DEFAULTS: dict[str, Any] = {  # diffusers' constructor defaults, shared by the three schedulers
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
_COMMON_SUPPORTED: dict[str, tuple] = {
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "rescale_betas_zero_snr": _OFF,
}


def _fail(key: str, value: Any, supported: tuple, where: str = "") -> SchedulerConfigError:
    """One-line error naming the option, its value and what the runtime supports."""
    listed = ", ".join(repr(s) for s in supported)
    return SchedulerConfigError(f"{where}{key}={value!r} is not supported by the numpy runtime; supported: {listed}")


def _check(sampler: str, key: str, value: Any, supported: tuple) -> None:
    # compare type too, so that True is not accepted where 1 is meant (and the reverse)
    if not any(value == s and type(value) is type(s) for s in supported):
        raise _fail(key, value, supported, f"sampler {sampler!r}: ")


def _torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=torch.float32), which diffusers uses for betas: float32 endpoints and step,
    each value one fused multiply-add from the nearer end (float32 products are exact in float64, so this matches)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, start32 + step * i, end32 - step * (n - 1 - i)).astype(np.float32)


def alphas_cumprod_from_config(config: dict) -> np.ndarray:
    """alphā_t = prod_{s<=t} (1 - beta_s) for t in [0, num_train_timesteps), returned as float64.

    Every timestep's noise level derives from this curve, so it follows diffusers' arithmetic exactly (betas and
    1 - beta in float32, the product accumulated in float64 and stored in float32, as torch.cumprod does on the CPU):
    that is the schedule a diffusers-trained model saw, and float64 betas would move the smallest noise levels
    (1 - alphā_0 cancels) by up to 1e-4 relative. All later math is float64.
    """
    opts = {**_COMMON_DEFAULTS, **{k: v for k, v in config.items() if k in _COMMON_DEFAULTS}}
    n_train = opts["num_train_timesteps"]
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise SchedulerConfigError(f"num_train_timesteps must be an integer >= 1, got {n_train!r}")
    if opts["rescale_betas_zero_snr"] not in _OFF:
        raise _fail("rescale_betas_zero_snr", opts["rescale_betas_zero_snr"], _OFF)
    if opts["trained_betas"] is None and opts["beta_schedule"] in ("linear", "scaled_linear"):
        for key in ("beta_start", "beta_end"):
            if isinstance(opts[key], bool) or not isinstance(opts[key], (int, float)) or not 0 <= opts[key] < 1:
                raise SchedulerConfigError(f"{key} must be a number in [0, 1), got {opts[key]!r}")
    if opts["trained_betas"] is not None:  # diffusers lets trained_betas override beta_schedule
        raw = opts["trained_betas"]
        if not isinstance(raw, (list, tuple, np.ndarray)) or len(raw) != n_train or not all(
            isinstance(beta, (int, float, np.floating)) and not isinstance(beta, bool) and 0 <= beta < 1 for beta in raw
        ):
            raise SchedulerConfigError(
                f"trained_betas must be a list of num_train_timesteps={n_train} numbers in [0, 1)")
        betas = np.asarray(raw, dtype=np.float64).astype(np.float32)
    elif opts["beta_schedule"] == "linear":
        betas = _torch_linspace_float32(opts["beta_start"], opts["beta_end"], n_train)
    elif opts["beta_schedule"] == "scaled_linear":
        # latent-diffusion schedule: linear in sqrt(beta) (Rombach et al. 2022)
        betas = _torch_linspace_float32(opts["beta_start"] ** 0.5, opts["beta_end"] ** 0.5, n_train) ** 2
    elif opts["beta_schedule"] == "squaredcos_cap_v2":
        # cosine schedule, Nichol & Dhariwal 2021 eq. (17): alphā(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008,
        # beta_t = min(1 - alphā(t+1)/alphā(t), 0.999)
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / n_train) / alpha_bar(i / n_train), 0.999) for i in range(n_train)]
        ).astype(np.float32)
    else:
        raise _fail("beta_schedule", opts["beta_schedule"], ("linear", "scaled_linear", "squaredcos_cap_v2"))
    # alphā_t = prod_{s=1}^{t} alpha_s, alpha_s = 1 - beta_s (Ho et al. 2020, Sec. 2)
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    # sigma_t = sqrt((1 - alphā_t) / alphā_t): the variance-exploding noise level (Karras et al. 2022, Table 1)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _spaced_timesteps(opts: dict, n: int, extra_point: bool) -> np.ndarray:
    """The timestep grid of diffusers' set_timesteps (spacings of Lin et al. 2023, Table 2), as float64 and unrounded
    for 'linspace'. DPM-Solver spaces n + 1 points and drops the last one (``extra_point``)."""
    n_train, m = opts["num_train_timesteps"], n + 1 if extra_point else n
    spacing = opts["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, n_train - 1, m)[::-1][:n].copy()
    elif spacing == "leading":
        step_ratio = n_train // m
        timesteps = (np.arange(0, m) * step_ratio).round()[::-1][:n] + opts["steps_offset"]
    else:  # trailing, with diffusers' expression, so that float rounding in np.arange gives the same grid
        timesteps = np.arange(n_train, 0, -n_train / n).round() - 1
    if len(timesteps) != n or timesteps.min() < 0 or timesteps.max() > n_train - 1:
        # e.g. 'trailing' with 61 of 1000 steps: np.arange yields 62 points, the last one timestep -1
        raise SchedulerConfigError(
            f"num_inference_steps={n} gives {len(timesteps)} timesteps in {timesteps.min():g}..{timesteps.max():g}, "
            f"not {n} in 0..{n_train - 1}; choose another step count or check steps_offset={opts['steps_offset']}, "
            f"timestep_spacing={spacing!r}")
    return timesteps


def _data_prediction(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(a, b) with x0 = a * x + b * model_output, for x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha  # x = alpha x0 + sigma eps (Ho et al. 2020, eq. 4) solved for x0
    return alpha, -sigma  # v = alpha * eps - sigma * x0  =>  x0 = alpha * x - sigma * v (Salimans & Ho 2022, Sec. 4)


def _build_dpmpp_2m(opts: dict, alphas_cumprod: np.ndarray, n: int) -> dict:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, as DPMSolverMultistepScheduler runs it."""
    timesteps = _spaced_timesteps(opts, n, extra_point=True)
    timesteps = (timesteps.round() if opts["timestep_spacing"] == "linspace" else timesteps).astype(np.int64)
    train_sigmas = _train_sigmas(alphas_cumprod)
    sigma_last = train_sigmas[0] if opts["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([train_sigmas[timesteps], [sigma_last]])
    # VP parametrisation x = alpha_t x0 + sigma_t eps, alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t
    alpha_t = 1.0 / np.sqrt(sigmas**2 + 1.0)
    sigma_t = sigmas * alpha_t
    with np.errstate(divide="ignore"):  # sigma_t = 0 at a final 'zero' sigma gives lambda = +inf, exp(-h) = 0
        # half log-SNR lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022)
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    table = _empty_table(n)
    for i in range(n):
        last = i == n - 1
        # diffusers: first order at step 0, and at the final step for euler_at_final, a final 'zero' sigma, or
        # lower_order_final with fewer than 15 steps ("improve numerical stability for small number of steps")
        lower_order_final = last and (
            opts["euler_at_final"] or (opts["lower_order_final"] and n < 15) or opts["final_sigmas_type"] == "zero"
        )
        second_order = opts["solver_order"] == 2 and i > 0 and not lower_order_final
        a, b = _data_prediction(opts["prediction_type"], alpha_t[i], sigma_t[i])
        h = lambda_t[i + 1] - lambda_t[i]  # h_i = lambda_{t_i} - lambda_{t_{i-1}}
        phi = alpha_t[i + 1] * np.expm1(-h)  # alpha_t (e^{-h} - 1)
        ratio = sigma_t[i + 1] / sigma_t[i]
        if second_order:
            r = (lambda_t[i] - lambda_t[i - 1]) / h  # r_i = h_{i-1} / h_i
            # Lu et al. Alg. 2: x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D,
            # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev  (diffusers' "midpoint" form: D0 + D1 / 2, D1 = (x0 - x0_prev) / r)
            c_x0, c_x0_prev = -phi * (1.0 + 0.5 / r), phi * 0.5 / r
        else:
            # DPM-Solver++ first-order step (= DDIM, Lu et al. 2022):
            # x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) x0
            c_x0, c_x0_prev = -phi, 0.0
        _put(table, i, a, b, c_sample=ratio + c_x0 * a, c_model_output=c_x0 * b, c_x0_prev=c_x0_prev)
    return {**table, "timesteps": [int(t) for t in timesteps], "timesteps_dtype": "int64",
            "sigmas": [float(s) for s in sigmas], "init_noise_sigma": 1.0, "input_scale": [1.0] * n}


def _build_euler(opts: dict, alphas_cumprod: np.ndarray, n: int) -> dict:
    """Euler on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 2 with S_churn = 0, no 2nd-order step), as
    EulerDiscreteScheduler runs it; its timesteps stay float32 and fractional for 'linspace', as in diffusers."""
    timesteps = _spaced_timesteps(opts, n, extra_point=False).astype(np.float32)
    train_sigmas = _train_sigmas(alphas_cumprod)
    sigma_last = train_sigmas[0] if opts["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([np.interp(timesteps.astype(np.float64), np.arange(len(train_sigmas)), train_sigmas),
                             [sigma_last]])
    sigma_max = float(sigmas.max())
    # diffusers quirk kept on purpose: 'leading' spacing starts from sqrt(sigma_max^2 + 1) instead of sigma_max
    init = sigma_max if opts["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1.0)
    table = _empty_table(n)
    for i in range(n):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]  # dt = sigma_{i+1} - sigma_i
        if opts["prediction_type"] == "epsilon":
            a, b = 1.0, -sigma  # x0 = x - sigma * eps (Karras et al. 2022, Table 1, VE form)
        else:
            # x0 = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1): v-prediction (Salimans & Ho 2022) in VE form
            a, b = 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
        # d = (x - x0) / sigma; x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d (Karras et al. 2022, Alg. 2)
        _put(table, i, a, b, c_sample=1.0 + dt * (1.0 - a) / sigma, c_model_output=-dt * b / sigma, c_x0_prev=0.0)
    return {**table, "timesteps": [float(t) for t in timesteps], "timesteps_dtype": "float32",
            "sigmas": [float(s) for s in sigmas], "init_noise_sigma": init,
            "input_scale": [float(1.0 / math.sqrt(s**2 + 1.0)) for s in sigmas[:n]]}  # c_in (Karras et al., Table 1)


def _build_ddim(opts: dict, alphas_cumprod: np.ndarray, n: int) -> dict:
    """Deterministic DDIM (eta = 0), Song et al. 2021 (arXiv:2010.02502) eq. (12), as DDIMScheduler runs it.
    The paper's alpha_t is alphā_t here."""
    timesteps = _spaced_timesteps(opts, n, extra_point=False)
    timesteps = (timesteps.round() if opts["timestep_spacing"] == "linspace" else timesteps).astype(np.int64)
    # final_alpha_cumprod: where the last step lands when t - T/n < 0
    final_alpha_cumprod = 1.0 if opts["set_alpha_to_one"] else float(alphas_cumprod[0])
    table, sigmas = _empty_table(n), []
    for i, t in enumerate(timesteps):
        prev_t = t - opts["num_train_timesteps"] // n  # diffusers steps T/n back, even when the grid is not uniform
        abar_t = alphas_cumprod[t]
        abar_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
        if opts["prediction_type"] == "epsilon":
            e_sample, e_output = 0.0, 1.0  # eps_hat = model_output
        else:
            e_sample, e_output = math.sqrt(1 - abar_t), math.sqrt(abar_t)  # eps = sqrt(alphā) v + sqrt(1 - alphā) x
        a, b = _data_prediction(opts["prediction_type"], math.sqrt(abar_t), math.sqrt(1 - abar_t))
        # x_{t-1} = sqrt(alphā_{t-1}) x0_hat + sqrt(1 - alphā_{t-1}) eps_hat  (eq. 12, sigma_t = 0)
        sa, sb = math.sqrt(abar_prev), math.sqrt(1 - abar_prev)
        _put(table, i, a, b, c_sample=sa * a + sb * e_sample, c_model_output=sa * b + sb * e_output, c_x0_prev=0.0)
        sigmas.append(float(math.sqrt((1 - abar_t) / abar_t)))
        if i == n - 1:
            sigmas.append(float(math.sqrt((1 - abar_prev) / abar_prev)))
    return {**table, "timesteps": [int(t) for t in timesteps], "timesteps_dtype": "int64",
            "sigmas": sigmas, "init_noise_sigma": 1.0, "input_scale": [1.0] * n}


def _empty_table(n: int) -> dict[str, list[float]]:
    keys = ("x0_c_sample", "x0_c_model_output", "c_sample", "c_model_output", "c_x0_prev")
    return {k: [0.0] * n for k in keys}


def _put(table: dict, i: int, a: float, b: float, *, c_sample: float, c_model_output: float, c_x0_prev: float) -> None:
    table["x0_c_sample"][i], table["x0_c_model_output"][i] = float(a), float(b)
    table["c_sample"][i], table["c_model_output"][i], table["c_x0_prev"][i] = (
        float(c_sample), float(c_model_output), float(c_x0_prev))


@dataclass(frozen=True)
class SamplerSpec:
    """One registry entry: the diffusers class it reproduces, its constructor defaults for the keys the runtime reads,
    the values the runtime supports for keys that change the math, and the table builder."""

    diffusers_class: str
    defaults: dict[str, Any]
    supported: dict[str, tuple]
    build: Callable[[dict, np.ndarray, int], dict]


SAMPLERS: dict[str, SamplerSpec] = {
    "dpmpp_2m": SamplerSpec(
        diffusers_class="DPMSolverMultistepScheduler",
        defaults={**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "solver_order": 2,
                  "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
                  "euler_at_final": False, "final_sigmas_type": "zero", "thresholding": False, "variance_type": None,
                  "lambda_min_clipped": -math.inf, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                  "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                  "use_dynamic_shifting": False},
        supported={**_COMMON_SUPPORTED, "solver_order": (1, 2), "algorithm_type": ("dpmsolver++",),
                   "solver_type": ("midpoint",), "lower_order_final": (True, False), "euler_at_final": (True, False),
                   "final_sigmas_type": ("zero", "sigma_min"), "thresholding": _OFF, "variance_type": (None,),
                   "lambda_min_clipped": (-math.inf,), "use_karras_sigmas": _OFF, "use_exponential_sigmas": _OFF,
                   "use_beta_sigmas": _OFF, "use_lu_lambdas": _OFF, "use_flow_sigmas": _OFF,
                   "use_dynamic_shifting": _OFF},
        build=_build_dpmpp_2m,
    ),
    "euler": SamplerSpec(
        diffusers_class="EulerDiscreteScheduler",
        defaults={**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "interpolation_type": "linear",
                  "timestep_type": "discrete", "final_sigmas_type": "zero", "use_karras_sigmas": False,
                  "use_exponential_sigmas": False, "use_beta_sigmas": False},
        supported={**_COMMON_SUPPORTED, "interpolation_type": ("linear",), "final_sigmas_type": ("zero", "sigma_min"),
                   "use_karras_sigmas": _OFF, "use_exponential_sigmas": _OFF, "use_beta_sigmas": _OFF},
        build=_build_euler,
    ),
    "ddim": SamplerSpec(
        diffusers_class="DDIMScheduler",
        defaults={**_COMMON_DEFAULTS, "timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True,
                  "thresholding": False},
        supported={**_COMMON_SUPPORTED, "clip_sample": (False,), "set_alpha_to_one": (True, False),
                   "thresholding": _OFF},
        build=_build_ddim,
    ),
}

# diffusers maps DEIS / UniPC solver types onto midpoint when such a config is loaded into the DPM scheduler
_DPM_SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def _resolve(sampler: str, config: dict) -> dict:
    """Class defaults overlaid with the config's known keys (other keys are ignored, as diffusers' from_config does)."""
    if sampler not in SAMPLERS:
        raise _fail("sampler", sampler, tuple(SAMPLERS))
    if not isinstance(config, dict):
        raise SchedulerConfigError(f"scheduler config must be a JSON object (dict), got {type(config).__name__}")
    spec = SAMPLERS[sampler]
    opts = {**spec.defaults, **{k: v for k, v in config.items() if k in spec.defaults}}
    if sampler == "dpmpp_2m" and isinstance(opts["solver_type"], str):
        opts["solver_type"] = _DPM_SOLVER_TYPE_ALIASES.get(opts["solver_type"], opts["solver_type"])
    if sampler == "euler" and opts["timestep_type"] == "continuous" and opts["prediction_type"] == "v_prediction":
        raise _fail("timestep_type", "continuous", ("discrete",), "sampler 'euler' with v_prediction: ")
    if sampler == "ddim" and "clip_sample" not in config:
        raise SchedulerConfigError("sampler 'ddim': clip_sample is absent, and DDIMScheduler then clips x0 to "
                                   "[-1, 1] (clip_sample=True), which the numpy runtime does not support; "
                                   "supported: False (set \"clip_sample\": false)")
    for key, supported in spec.supported.items():
        _check(sampler, key, opts[key], supported)
    steps_offset = opts["steps_offset"]
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise SchedulerConfigError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
    return opts


def build_step_table(sampler: str, config: dict, num_inference_steps: int) -> dict:
    """Precompute everything the denoising loop needs into one JSON-serialisable dict.

    The table is the single source of truth for the runtime and for the bundle's manifest: ``timesteps`` are exactly
    the values diffusers feeds the UNet for the same config, and each update is a linear combination of the sample, the
    model output and (DPM-Solver++ 2M) the previous step's x0, as written in the table's ``formula``.
    """
    opts = _resolve(sampler, config)
    alphas_cumprod = alphas_cumprod_from_config(opts)
    n_train = opts["num_train_timesteps"]
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_train:
        raise SchedulerConfigError(
            f"num_inference_steps must be an integer in 1..num_train_timesteps={n_train}, got {n!r}")
    table = SAMPLERS[sampler].build(opts, alphas_cumprod, n)
    return {
        "step_table_version": STEP_TABLE_VERSION,
        "sampler": sampler,
        "diffusers_class": SAMPLERS[sampler].diffusers_class,
        "prediction_type": opts["prediction_type"],
        "num_inference_steps": n,
        "formula": FORMULA,
        **table,
    }


def init_noise_sigma(step_table: dict) -> float:
    """Standard deviation of the initial latent noise (1 for DDIM and DPM-Solver++, sigma_max-based for Euler)."""
    return float(step_table["init_noise_sigma"])


def _index(step_table: dict, step_index: int) -> int:
    n = step_table["num_inference_steps"]
    if isinstance(step_index, bool) or not isinstance(step_index, (int, np.integer)) or not 0 <= step_index < n:
        raise SchedulerConfigError(f"step_index must be an integer in 0..{n - 1} for this {n}-step table, "
                                   f"got {step_index!r}")
    return int(step_index)


def scale_model_input(step_table: dict, step_index: int, sample: np.ndarray) -> np.ndarray:
    """The UNet input for this step: ``input_scale[i] * sample`` (Euler preconditions by 1/sqrt(sigma^2+1))."""
    i = _index(step_table, step_index)
    return (np.asarray(sample, dtype=np.float64) * step_table["input_scale"][i]).astype(sample.dtype)


def sampler_step(step_table: dict, step_index: int, model_output: np.ndarray, sample: np.ndarray,
                 state: dict) -> np.ndarray:
    """One denoising update from the table's linear coefficients; float64 inside, the sample's dtype out.

    ``state`` carries what a multistep method needs between calls (``state["x0_prev"]``, the previous data prediction);
    pass the same dict, initially empty, to every step of one trajectory.
    """
    i = _index(step_table, step_index)
    x = np.asarray(sample, dtype=np.float64)
    model_output = np.asarray(model_output, dtype=np.float64)
    x0 = step_table["x0_c_sample"][i] * x + step_table["x0_c_model_output"][i] * model_output
    x_next = step_table["c_sample"][i] * x + step_table["c_model_output"][i] * model_output
    c_x0_prev = step_table["c_x0_prev"][i]
    if c_x0_prev != 0.0:
        if "x0_prev" not in state:
            raise SchedulerConfigError(f"step {i} of {step_table['sampler']!r} needs state['x0_prev'] from step "
                                       f"{i - 1}; run the steps in order with one state dict")
        x_next = x_next + c_x0_prev * state["x0_prev"]
    state["x0_prev"] = x0
    return x_next.astype(sample.dtype)
