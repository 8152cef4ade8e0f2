"""Noise schedules and samplers: DDPM (ancestral), DDIM (eta) and DPM-Solver++(2M).

Each scheduler only computes the per-sample coefficients of one update; the elementwise work
(classifier-free guidance, x0 from the prediction type, clipping / dynamic thresholding and the
linear combination) is one call of the fused op :func:`biogen.ops.sampler_step`.

Configuration names, defaults and timestep spacings follow diffusers (``DDPMScheduler``,
``DDIMScheduler``, ``DPMSolverMultistepScheduler``) so that a config can be carried over; the
tests compare full seeded loops with diffusers, with clipping and thresholding active. As in
diffusers, DDIM's direction term uses the network's eps even when x0 was clipped;
``step(..., use_clipped_model_output=True)`` re-derives it from the clipped x0 instead.

With the forward process ``x_t = alpha_t x0 + sigma_t eps`` (``alpha_t = sqrt(alphas_cumprod[t])``,
``sigma_t = sqrt(1 - alphas_cumprod[t])``), a model output ``m`` means, per ``prediction_type``:
``epsilon``: eps; ``sample``: x0; ``v_prediction``: ``alpha_t eps - sigma_t x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Union

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

Timestep = Union[int, torch.Tensor]


# ------------------------------------------------------------------------------------ configs


@dataclass
class SchedulerConfig:
    """Options shared by every scheduler (names and meanings as in diffusers).

    Parameters
    ----------
    num_train_timesteps : length of the training noise schedule.
    beta_start, beta_end : first and last beta of the ``linear`` / ``scaled_linear`` schedules.
    beta_schedule : 'linear', 'scaled_linear' (linear in sqrt(beta)) or 'squaredcos_cap_v2' (cosine).
    prediction_type : what the network predicts: 'epsilon', 'sample' (x0) or 'v_prediction'.
    clip_sample, clip_sample_range : clamp the predicted x0 to [-range, range].
    thresholding, dynamic_thresholding_ratio, sample_max_value : Imagen dynamic thresholding of x0
        (per sample, s = clamp(quantile(|x0|, ratio), 1, sample_max_value); x0 = clamp(x0, -s, s) / s);
        takes precedence over ``clip_sample``.
    timestep_spacing : how inference timesteps are laid on the training schedule
        ('leading', 'trailing' or 'linspace').
    steps_offset : added to every inference timestep ('leading' spacing).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.beta_schedule != "squaredcos_cap_v2" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        if self.sample_max_value < 1:
            raise ValueError(f"sample_max_value must be >= 1 (the threshold is clamped to [1, max]), got {self.sample_max_value}")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {self.steps_offset!r}")


@dataclass
class DDPMConfig(SchedulerConfig):
    """DDPM options; ``variance_type`` 'fixed_small' is the posterior variance (only one supported)."""

    variance_type: str = "fixed_small"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("variance_type", self.variance_type, ("fixed_small",))


@dataclass
class DDIMConfig(SchedulerConfig):
    """DDIM options; ``set_alpha_to_one``: the step after the last goes to alpha_cumprod = 1 (clean)."""

    set_alpha_to_one: bool = True


@dataclass
class DPMSolverConfig(SchedulerConfig):
    """DPM-Solver++ (multistep, data prediction) options.

    ``solver_order`` 1 or 2; ``lower_order_final`` uses first/second order for the last steps when
    there are fewer than 15 (more stable); the last step always goes to sigma = 0.
    """

    clip_sample: bool = False
    timestep_spacing: str = "linspace"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {self.solver_order!r}")
        _choice("algorithm_type", self.algorithm_type, ("dpmsolver++",))
        _choice("solver_type", self.solver_type, ("midpoint",))


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")


# ------------------------------------------------------------------------------------ schedules


def betas_for_schedule(config: SchedulerConfig) -> torch.Tensor:
    """The training betas, float32 ``(num_train_timesteps,)``."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    # Nichol & Dhariwal cosine schedule, betas capped at 0.999 so the last step keeps some signal
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


@dataclass
class SchedulerOutput:
    """One sampler step: ``prev_sample`` is x at the next timestep, ``pred_original_sample`` the x0
    estimate (after clipping / thresholding); both shaped like the sample."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class _Scheduler:
    config_class = SchedulerConfig

    def __init__(self, config: Optional[SchedulerConfig] = None, **kwargs) -> None:
        if config is not None and kwargs:
            raise TypeError("pass either a config object or keyword options, not both")
        if config is None:
            names = {f.name for f in fields(self.config_class)}
            unknown = sorted(set(kwargs) - names)
            if unknown:
                raise TypeError(
                    f"{type(self).__name__} got unknown option(s) {', '.join(unknown)}; "
                    f"known: {', '.join(sorted(names))}"
                )
            config = self.config_class(**kwargs)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.betas = betas_for_schedule(config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # coefficients are computed in float64 from the float32 schedule, then handed to the op in float32
        self._acp = self.alphas_cumprod.double()
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[torch.Tensor] = None
        self._index: dict[int, int] = {}

    # -------------------------------------------------------------- public API

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[Timestep] = None) -> torch.Tensor:
        """Identity (these schedulers need no input scaling); kept for loop compatibility."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """The forward process ``sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise``.

        original_samples, noise: (batch, ...); timesteps: int or (batch,) integer tensor.
        """
        if original_samples.shape != noise.shape:
            raise ValueError(
                f"noise must have the shape of original_samples {tuple(original_samples.shape)}, got {tuple(noise.shape)}"
            )
        t = torch.as_tensor(timesteps, device="cpu").long().reshape(-1)
        if t.numel() not in (1, original_samples.shape[0]):
            raise ValueError(f"timesteps must be one value or one per sample ({original_samples.shape[0]}), got {t.numel()}")
        n = self.config.num_train_timesteps
        if bool(((t < 0) | (t >= n)).any()):
            raise ValueError(f"timesteps must lie in [0, {n - 1}], got {t.tolist()}")
        acp = self._acp[t]
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = acp.sqrt().to(original_samples.device, original_samples.dtype).view(shape)
        s = (1 - acp).sqrt().to(original_samples.device, original_samples.dtype).view(shape)
        return a * original_samples + s * noise

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """Choose ``num_inference_steps`` timesteps (descending) from the training schedule."""
        n = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= n:
            raise ValueError(
                f"num_inference_steps must be an integer in [1, num_train_timesteps={n}], got {num_inference_steps!r}"
            )
        ts = self._make_timesteps(int(num_inference_steps))
        if len(np.unique(ts)) != len(ts) or ts.min() < 0 or ts.max() >= n:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} with timestep_spacing={self.config.timestep_spacing!r} "
                f"gives repeated or out-of-range timesteps {ts.tolist()[:8]}...; use fewer steps or another spacing"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(ts.copy()).to(device=device, dtype=torch.int64)
        self._index = {int(t): i for i, t in enumerate(ts)}
        self._reset_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        *,
        model_output_uncond: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        variance_noise: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
        **kwargs,
    ) -> SchedulerOutput:
        """One reverse step from ``timestep`` to the next timestep of the schedule.

        Parameters
        ----------
        model_output : (batch, ...) the network output at ``timestep`` (the conditional one when
            guiding).
        timestep : one of ``self.timesteps``.
        sample : (batch, ...) the current x_t.
        generator : random generator for the step's noise (DDPM, DDIM with eta > 0).
        model_output_uncond : (batch, ...) the unconditional output; with it the guided output
            ``uncond + guidance_scale * (cond - uncond)`` is used (fused into the step).
        variance_noise : (batch, ...) explicit noise instead of drawing it from ``generator``.
        backend : kernel backend of :func:`biogen.ops.sampler_step`.
        **kwargs : per-scheduler step options, as diffusers' (DDIM: ``eta``, ``use_clipped_model_output``).
        """
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before set_timesteps(num_inference_steps)")
        t = self._timestep_int(timestep)
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be torch tensors")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output must have the shape of sample {tuple(sample.shape)}, got {tuple(model_output.shape)}"
            )
        if model_output_uncond is not None and model_output_uncond.shape != sample.shape:
            raise ValueError(
                f"model_output_uncond must have the shape of sample {tuple(sample.shape)}, "
                f"got {tuple(model_output_uncond.shape)}"
            )
        if variance_noise is not None and variance_noise.shape != sample.shape:
            raise ValueError(
                f"variance_noise must have the shape of sample {tuple(sample.shape)}, got {tuple(variance_noise.shape)}"
            )
        return self._step(
            model_output, t, sample, generator, model_output_uncond, float(guidance_scale), variance_noise, backend,
            **kwargs,
        )

    # -------------------------------------------------------------- helpers

    def _reset_state(self) -> None:
        pass

    def _timestep_int(self, timestep: Timestep) -> int:
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        if isinstance(timestep, float) and not timestep.is_integer():
            raise ValueError(f"timestep must be an integer, got {timestep}")
        t = int(timestep)
        n = self.config.num_train_timesteps
        if not 0 <= t < n:
            raise ValueError(f"timestep {t} is out of range [0, {n - 1}]")
        if t not in self._index:
            raise ValueError(
                f"timestep {t} is not in the schedule set by set_timesteps({self.num_inference_steps}); "
                f"use the values of scheduler.timesteps"
            )
        return t

    def _coef(self, value: float, sample: torch.Tensor) -> torch.Tensor:
        return torch.full((sample.shape[0],), value, dtype=torch.float32, device=sample.device)

    def _clip_kwargs(self) -> dict:
        c = self.config
        return dict(
            clip_sample=(c.clip_sample_range if c.clip_sample and not c.thresholding else None),
            dynamic_threshold=(c.dynamic_thresholding_ratio if c.thresholding else None),
            sample_max_value=c.sample_max_value,
        )

    @staticmethod
    def _noise(sample: torch.Tensor, generator: Optional[torch.Generator], given: Optional[torch.Tensor]) -> torch.Tensor:
        if given is not None:
            return given.to(sample.dtype)
        # drawn on the generator's device, as diffusers' randn_tensor does, so seeded runs agree
        device = generator.device if generator is not None else sample.device
        return torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype).to(sample.device)

    def _spaced(self, n_steps: int, leading_extra: int = 0) -> np.ndarray:
        """diffusers' spacings; ``leading_extra`` = 1 lays n + 1 points and drops the last (DPM-Solver)."""
        c, n = self.config, self.config.num_train_timesteps
        m = n_steps + leading_extra
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, m).round()[::-1][: n_steps].astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = n // m
            ts = (np.arange(0, m) * ratio).round()[::-1][:n_steps].astype(np.int64) + c.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / n_steps)).astype(np.int64) - 1
        return ts

    def _make_timesteps(self, n_steps: int) -> np.ndarray:
        return self._spaced(n_steps)

    def _prev_timestep(self, t: int) -> int:
        """The next timestep of the schedule after ``t`` (-1 after the last)."""
        i = self._index[t]
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class DDPMScheduler(_Scheduler):
    """Ancestral DDPM sampling with the posterior variance ('fixed_small').

    From timestep t to the previous scheduled timestep p (strided schedules use
    ``beta = 1 - acp[t] / acp[p]``):
    ``x_p = sqrt(acp[p]) beta / (1 - acp[t]) x0 + sqrt(1 - beta) (1 - acp[p]) / (1 - acp[t]) x_t + std z``,
    ``std^2 = (1 - acp[p]) / (1 - acp[t]) beta``, no noise at t = 0.
    """

    config_class = DDPMConfig

    def posterior(self, t: int) -> tuple[float, float, float]:
        """(coefficient of x0, coefficient of x_t, variance) of the step from ``t``."""
        p = self._prev_timestep(t)
        a_t = float(self._acp[t])
        a_p = float(self._acp[p]) if p >= 0 else 1.0
        beta = 1 - a_t / a_p
        c_x0 = math.sqrt(a_p) * beta / (1 - a_t)
        c_s = math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t)
        var = max((1 - a_p) / (1 - a_t) * beta, 1e-20)
        return c_x0, c_s, var

    def _step(self, m, t, x, generator, m_u, w, noise, backend):
        from biogen.ops import sampler_step

        c_x0, c_s, var = self.posterior(t)
        a_t = float(self._acp[t])
        z = self._noise(x, generator, noise) if t > 0 else None
        prev, x0 = sampler_step(
            x, m,
            alpha_t=self._coef(math.sqrt(a_t), x), sigma_t=self._coef(math.sqrt(1 - a_t), x),
            c_sample=self._coef(c_s, x), c_x0=self._coef(c_x0, x),
            c_noise=None if z is None else self._coef(math.sqrt(var), x), noise=z,
            prediction_type=self.config.prediction_type, model_output_uncond=m_u, guidance_scale=w,
            backend=backend, **self._clip_kwargs(),
        )
        return SchedulerOutput(prev, x0)


class DDIMScheduler(_Scheduler):
    """DDIM: ``x_p = sqrt(acp[p]) x0 + sqrt(1 - acp[p] - std^2) eps + std z`` with
    ``std = eta sqrt((1 - acp[p]) / (1 - acp[t]) (1 - acp[t] / acp[p]))``; eta = 0 is deterministic,
    eta = 1 is DDPM-like. ``p`` is the next timestep of the schedule (after the last: the clean end,
    ``acp = 1`` with ``set_alpha_to_one``, else ``acp[0]``). diffusers uses
    ``p = t - num_train_timesteps // num_inference_steps`` instead, the same whenever the schedule is
    evenly strided ('leading', or 'trailing' with a step count dividing num_train_timesteps); for
    'linspace' its update lands between scheduled timesteps, so x0 is not recovered exactly.
    """

    config_class = DDIMConfig

    def _step(self, m, t, x, generator, m_u, w, noise, backend, eta: float = 0.0,
              use_clipped_model_output: bool = False):
        """``eta`` and ``use_clipped_model_output`` (the direction term uses the eps of the clipped x0,
        not the network's) are diffusers' ``DDIMScheduler.step`` options."""
        from biogen.ops import sampler_step

        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        p = self._prev_timestep(t)
        a_t = float(self._acp[t])
        final = 1.0 if self.config.set_alpha_to_one else float(self._acp[0])
        a_p = float(self._acp[p]) if p >= 0 else final
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        std = eta * math.sqrt(max(var, 0.0))
        z = self._noise(x, generator, noise) if eta > 0 else None
        prev, x0 = sampler_step(
            x, m,
            alpha_t=self._coef(math.sqrt(a_t), x), sigma_t=self._coef(math.sqrt(1 - a_t), x),
            c_sample=self._coef(0.0, x), c_x0=self._coef(math.sqrt(a_p), x),
            c_eps=self._coef(math.sqrt(max(1 - a_p - std**2, 0.0)), x),
            c_noise=None if z is None else self._coef(std, x), noise=z,
            prediction_type=self.config.prediction_type, model_output_uncond=m_u, guidance_scale=w,
            use_clipped_model_output=bool(use_clipped_model_output), backend=backend, **self._clip_kwargs(),
        )
        return SchedulerOutput(prev, x0)


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint second-order update.

    With ``lambda = log(alpha / sigma)`` and ``h = lambda_next - lambda_t``:
    first order ``x_next = sigma_next / sigma_t x_t - alpha_next (e^-h - 1) x0_t`` (= DDIM, eta 0);
    second order adds ``D1 = (x0_t - x0_prev) / r``, ``r = h_prev / h``, weighted by one half.
    The last step goes to sigma = 0, i.e. returns the final x0 estimate.
    """

    config_class = DPMSolverConfig

    def _reset_state(self) -> None:
        self._last: Optional[tuple[int, torch.Tensor]] = None  # (step index, x0) of the previous step

    def _make_timesteps(self, n_steps: int) -> np.ndarray:
        if self.config.timestep_spacing == "trailing":
            return self._spaced(n_steps)
        return self._spaced(n_steps, leading_extra=1)

    def _alpha_sigma(self, i: int) -> tuple[float, float]:
        """(alpha, sigma) at schedule index ``i``; index ``len(timesteps)`` is the clean end (0 noise)."""
        if i >= len(self.timesteps):
            return 1.0, 0.0
        a = float(self._acp[int(self.timesteps[i])])
        return math.sqrt(a), math.sqrt(1 - a)

    def _step(self, m, t, x, generator, m_u, w, noise, backend):
        from biogen.ops import sampler_step

        i = self._index[t]
        n = len(self.timesteps)
        a_s, s_s = self._alpha_sigma(i)
        a_t, s_t = self._alpha_sigma(i + 1)
        if s_t == 0.0:  # lambda = inf: the update is exactly x0
            c_s, c_x = 0.0, a_t
        else:
            h = math.log(a_t / s_t) - math.log(a_s / s_s)
            c_s, c_x = s_t / s_s, -a_t * math.expm1(-h)
        # the final step to sigma = 0 is always first order (it returns the x0 estimate), as in diffusers
        # with final_sigmas_type "zero"; so with solver_order <= 2, lower_order_final changes nothing more
        first = (
            self.config.solver_order == 1
            or self._last is None
            or self._last[0] != i - 1
            or i == n - 1
        )
        c_prev = None
        prev_x0 = None
        if not first:
            a_p, s_p = self._alpha_sigma(i - 1)
            h = math.log(a_t / s_t) - math.log(a_s / s_s)
            h0 = math.log(a_s / s_s) - math.log(a_p / s_p)
            r0 = h0 / h
            c_prev = -0.5 * c_x / r0
            c_x = c_x * (1 + 0.5 / r0)
            prev_x0 = self._last[1]
        prev, x0 = sampler_step(
            x, m,
            alpha_t=self._coef(a_s, x), sigma_t=self._coef(s_s, x),
            c_sample=self._coef(c_s, x), c_x0=self._coef(c_x, x),
            prev_x0=prev_x0, c_prev_x0=None if c_prev is None else self._coef(c_prev, x),
            prediction_type=self.config.prediction_type, model_output_uncond=m_u, guidance_scale=w,
            backend=backend, **self._clip_kwargs(),
        )
        self._last = (i, x0)
        return SchedulerOutput(prev, x0)


SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_scheduler(name: str, **config) -> _Scheduler:
    """A scheduler by name ('ddpm', 'ddim', 'dpmsolver++') with diffusers-style options."""
    _choice("scheduler", name, tuple(SCHEDULERS))
    return SCHEDULERS[name](**config)
