"""Diffusion noise schedules, samplers (step maths) and sampling loops."""

from .sampling import cfg_forward, sample

from .schedulers import (
    DDIMConfig,
    DDIMScheduler,
    DDPMConfig,
    DDPMScheduler,
    DPMSolverConfig,
    DPMSolverMultistepScheduler,
    SchedulerConfig,
    SchedulerOutput,
    betas_for_schedule,
    make_scheduler,
)

__all__ = [
    "DDIMConfig",
    "DDIMScheduler",
    "DDPMConfig",
    "DDPMScheduler",
    "DPMSolverConfig",
    "DPMSolverMultistepScheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "betas_for_schedule",
    "cfg_forward",
    "make_scheduler",
    "sample",
]
