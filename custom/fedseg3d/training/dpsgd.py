"""Patient-level DP-SGD for one site's local training, with Opacus (Abadi et al., CCS 2016).

The unit protected is ONE PATIENT (one training case): the site's released update is (epsilon, delta)-DP with
respect to adding or removing any one patient's volume. Two things make the clipped unit a patient, not a patch:

* One clipped gradient per patient per step. The ordinary loader draws ``samples_per_volume`` patches from every
  volume; if two patches of the same patient were clipped separately, the patient's contribution could reach twice
  ``max_grad_norm``. Here the dataset has exactly one element per patient, and each draw of that element crops
  ``patches_per_patient`` random patches (``samples_per_volume`` is ignored). With more than one, the per-patch
  gradients of a patient are averaged *before* clipping (``average_grad_samples_per_patient``), so a patient
  still contributes one gradient of norm at most ``max_grad_norm`` to a step: augmentation multiplicity
  (De et al. 2022, "Unlocking high-accuracy differentially private image classification through scale", Sec. 3.1),
  which lowers the variance of each patient's gradient at no privacy cost, for K times the compute.
* Poisson sampling of patients. Opacus's ``DPDataLoader`` includes every patient in a step independently with
  probability ``q = patients_per_step / n_patients``; that is the sampling the accountant assumes
  (``fedseg3d.privacy.accounting.patient_dpsgd_mechanism``). A step whose sample is empty still adds noise and
  counts as a step, as the analysis requires.

Opacus pieces used as they are: ``ModuleValidator`` (refuses batch norm, which mixes samples), ``GradSampleModule``
(per-sample gradients, covering MONAI's Conv3d / ConvTranspose3d / InstanceNorm3d / PReLU), ``DPOptimizer``
(per-sample clipping and Gaussian noise) and an ``RDPAccountant`` attached as the optimizer's step hook. They are
assembled directly instead of through ``PrivacyEngine.make_private`` because ``make_private`` takes the sample rate
as ``1 / len(data_loader)``, which differs from ``patients_per_step / n_patients`` when the division is not exact;
the accountant must be told the rate the sampler really uses.

Why not ``ModuleValidator.fix``: it would swap batch norm for group norm at the site only, so the site's network
would no longer match the server's. The job must name a preset without batch norm (``unet3d_tiny_instancenorm``).

Each round also logs the per-patient gradient norms before clipping (``ClipStatistics``), in the site's log only, so
that a site can set ``max_grad_norm`` near them: a clip norm far above them adds noise for signal that is not there.

With ``target_epsilon`` the noise multiplier is not a job setting: ``DPSGDPlan`` calibrates it once per site for the
rounds the job has left (``fedseg3d.training.dpsgd_plan``).

Not covered: the per-round metrics the learner reports (loss, validation Dice on the site's validation cases), and
the number of training cases used to weight the average. Noise comes from torch's generator unless
``secure_mode`` (Opacus's cryptographically secure RNG; needs the ``torchcsprng`` package).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.data import Dataset, list_data_collate
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from fedseg3d.data.transforms import PreprocessConfig, train_augment_transform
from fedseg3d.privacy.accounting import Mechanism, noise_multiplier_for, patient_dpsgd_mechanism
from fedseg3d.training.loops import TrainStats, make_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSGDConfig:
    """The job's DP-SGD knobs (the learner's ``dp_sgd`` block).

    Attributes:
        noise_multiplier: sigma; per-step noise std is ``sigma * max_grad_norm`` on the sum of clipped gradients.
        max_grad_norm: C, the per-patient (per-sample) gradient clip norm.
        patients_per_step: expected number of patients per step; the Poisson rate is this over the site's patients.
        steps_per_round: DP-SGD steps per round; 0 means ``passes_per_round`` expected passes over the patients
            (``passes_per_round * ceil(n_patients / patients_per_step)`` steps).
        passes_per_round: expected passes over the patients per round when ``steps_per_round`` is 0 (the job's
            ``local_epochs``, so DP-SGD gets the same data budget as the other jobs).
        secure_mode: draw noise and the Poisson sample from a cryptographically secure generator
            (``torchcsprng``, as ``opacus.PrivacyEngine(secure_mode=True)`` does) and use Opacus's hardened noise
            sampling. Refused when the job starts if ``torchcsprng`` is not installed.
        target_epsilon: 0 (default) trains with ``noise_multiplier``. Above 0, the site picks its own noise
            multiplier so that the whole job spends at most this epsilon on one patient (``calibrated``), and
            ``noise_multiplier`` is not used; until then the configuration refuses to say what it releases.
        patches_per_patient: K random patches cropped from each sampled patient per step; their gradients are
            averaged before the patient's gradient is clipped, so epsilon does not change and a step costs K times
            the compute (augmentation multiplicity).
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    patients_per_step: int = 2
    steps_per_round: int = 0
    passes_per_round: int = 1
    secure_mode: bool = False
    target_epsilon: float = 0.0
    patches_per_patient: int = 1

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"dp_sgd.{name} must be a finite number > 0, got {value!r}")
        for name, low in (
            ("patients_per_step", 1),
            ("steps_per_round", 0),
            ("passes_per_round", 1),
            ("patches_per_patient", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"dp_sgd.{name} must be an integer >= {low}, got {value!r}")
        value = self.target_epsilon
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise ValueError(
                f"dp_sgd.target_epsilon must be a finite number >= 0 (0: use noise_multiplier), got {value!r}"
            )
        if not isinstance(self.secure_mode, bool):
            raise ValueError(f"dp_sgd.secure_mode must be true or false, got {self.secure_mode!r}")
        if self.secure_mode:
            secure_generator()  # fail when the job starts, not in round 1

    @classmethod
    def from_dict(cls, raw: dict | None) -> DPSGDConfig | None:
        """Parse the learner's ``dp_sgd`` block; ``None`` or ``{}`` means DP-SGD is off. Unknown keys are errors."""
        if not raw:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"dp_sgd has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**raw)

    def steps_for(self, n_patients: int) -> int:
        """Steps in one round at a site with ``n_patients`` training cases."""
        return self.steps_per_round or self.passes_per_round * math.ceil(n_patients / self.patients_per_step)

    def mechanism(self, n_patients: int, steps: int) -> Mechanism:
        """What ``steps`` steps at a site of ``n_patients`` release, for the site ledger.

        Raises:
            ValueError: ``patients_per_step`` exceeds the site's number of patients.
            RuntimeError: ``target_epsilon`` is set and the noise multiplier has not been calibrated yet.
        """
        if self.target_epsilon:
            # Fail closed: the fixed noise_multiplier of a calibrating job is not what it should train with.
            raise RuntimeError(
                f"dp_sgd.target_epsilon is {self.target_epsilon}: calibrate the noise multiplier for this site "
                f"(DPSGDConfig.calibrated) before training"
            )
        self._check_patients(n_patients)
        return patient_dpsgd_mechanism(self.noise_multiplier, self.patients_per_step, n_patients, steps)

    def _check_patients(self, n_patients: int) -> None:
        if self.patients_per_step > n_patients:
            raise ValueError(
                f"dp_sgd.patients_per_step ({self.patients_per_step}) exceeds this site's {n_patients} training "
                f"patient(s); lower it in the job"
            )

    def calibrated(self, n_patients: int, rounds: int, delta: float, accountant: str = "rdp") -> DPSGDConfig:
        """This configuration with the noise multiplier that makes ``rounds`` rounds at a site of ``n_patients``
        spend at most ``target_epsilon`` (one patient, at ``delta``), and ``target_epsilon`` cleared.

        The noise multiplier comes from Opacus's calibration (``fedseg3d.privacy.accounting.noise_multiplier_for``)
        for the rate ``patients_per_step / n_patients`` and ``rounds * steps_for(n_patients)`` steps: the mechanism
        the site ledger will be charged with, so this job's epsilon after its last round is at most the target (the
        site budget still bounds what earlier jobs spent).

        Raises:
            ValueError: ``target_epsilon`` is 0, ``rounds`` < 1, ``patients_per_step`` exceeds ``n_patients``, or no
                noise multiplier reaches the target (each message names the ``dp_sgd`` field).
        """
        if not self.target_epsilon:
            raise ValueError("dp_sgd.target_epsilon is 0: there is nothing to calibrate (noise_multiplier is used)")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"dp_sgd.target_epsilon: calibration needs a number of rounds >= 1, got {rounds!r}")
        self._check_patients(n_patients)
        rate, steps = self.patients_per_step / n_patients, rounds * self.steps_for(n_patients)
        try:
            sigma = noise_multiplier_for(self.target_epsilon, delta, rate, steps, accountant)
        except ValueError as err:
            raise ValueError(f"dp_sgd.target_epsilon={self.target_epsilon} cannot be calibrated: {err}") from err
        return dataclasses.replace(self, noise_multiplier=sigma, target_epsilon=0.0)


class PatientPatches(Dataset):
    """One element per patient; each access crops ``patches`` random patches from that patient's volume.

    Args:
        items: preprocessed cases (``{"image", "label", ...}``), one per patient.
        preprocessing: the job's preprocessing; its ``samples_per_volume`` is replaced by ``patches``.
        seed: seeds the random crop and augmentation.
        patches: patches per access (``DPSGDConfig.patches_per_patient``).

    Each element is ``{"image", "label"}`` with a leading patch axis, ``(patches, C, D, H, W)``, so that a collated
    batch ``(patients, patches, C, D, H, W)`` keeps every patch with its patient.
    """

    def __init__(self, items: list[dict], preprocessing: PreprocessConfig, seed: int, patches: int = 1) -> None:
        augment = train_augment_transform(dataclasses.replace(preprocessing, samples_per_volume=patches))
        augment.set_random_state(seed=seed)
        super().__init__(data=items, transform=augment)

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        # The random crop (see patch_sampler) returns a list of num_samples crops; stack them under one patient.
        # Only the tensors: Opacus builds empty batches by structure and cannot handle the string case id.
        crops = sample if isinstance(sample, list) else [sample]
        return {key: torch.stack([torch.as_tensor(crop[key]) for crop in crops]) for key in ("image", "label")}


def check_model_supports_dpsgd(model: torch.nn.Module, preset: str) -> None:
    """Refuse models Opacus cannot give correct per-sample gradients for (batch norm mixes the samples).

    Raises:
        ValueError: naming the preset and Opacus's objections.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        first = str(errors[0]).split(". ")[0]  # Opacus's messages run to a paragraph; the first sentence says it
        raise ValueError(
            f"model preset '{preset}' cannot be trained with DP-SGD ({len(errors)} Opacus validation error(s), "
            f"first: {first}); use a preset without batch norm such as 'unet3d_tiny_instancenorm'"
        )


def make_patient_loader(
    items: list[dict], preprocessing: PreprocessConfig, config: DPSGDConfig, seed: int
) -> DPDataLoader:
    """Opacus's Poisson-sampling loader over patients, at rate ``patients_per_step / len(items)``."""
    config.mechanism(len(items), 1)  # validates patients_per_step against the site's size
    dataset = PatientPatches(items, preprocessing, seed, config.patches_per_patient)
    generator = secure_generator() if config.secure_mode else torch.Generator().manual_seed(seed)
    loader = DPDataLoader(
        dataset,
        sample_rate=config.patients_per_step / len(items),
        collate_fn=list_data_collate,
        generator=generator,
        num_workers=0,
    )
    # Opacus builds an empty *first* batch from the shapes and dtypes of the elements of dataset[0]; our samples
    # are dicts, so it iterates their keys and fails (torch.zeros with dtype=str). Without those hints it returns
    # an empty list, which train_dpsgd handles as a step with nobody sampled.
    loader.collate_fn.sample_empty_shapes = None
    loader.collate_fn.dtypes = None
    return loader


def secure_generator() -> torch.Generator:
    """A generator reading /dev/urandom, from ``torchcsprng`` (the one ``opacus.PrivacyEngine`` uses).

    Raises:
        RuntimeError: ``torchcsprng`` is not installed.
    """
    try:
        import torchcsprng  # noqa: PLC0415 - optional dependency, only for secure_mode
    except ImportError as err:
        raise RuntimeError("dp_sgd.secure_mode needs the torchcsprng package, which is not installed") from err
    return torchcsprng.create_random_device_generator("/dev/urandom")


@dataclass(frozen=True)
class ClipStatistics:
    """How the per-patient gradients of a round compared with the clip norm, before clipping.

    Why: the clip norm decides how much of each patient's gradient survives against noise of scale
    ``noise_multiplier * max_grad_norm``. A clip norm above most gradient norms adds noise for signal that is never
    there; one far below them only shortens every step alike. These figures are computed from the private data
    without noise, so they stay in the site's own log and are never sent or streamed.

    Attributes:
        median: median per-patient gradient L2 norm over the round's steps.
        p90: its 90th percentile.
        clipped_fraction: share of per-patient gradients whose norm exceeded ``max_grad_norm``.
        count: per-patient gradients seen.
    """

    median: float
    p90: float
    clipped_fraction: float
    count: int

    @classmethod
    def of(cls, norms: torch.Tensor, max_grad_norm: float) -> ClipStatistics | None:
        """Summarise a 1-D tensor of per-patient gradient norms; ``None`` when there are none."""
        if norms.numel() == 0:
            return None
        norms = norms.detach().float().cpu()
        median, p90 = torch.quantile(norms, torch.tensor([0.5, 0.9])).tolist()
        clipped = float((norms > max_grad_norm).float().mean())
        return cls(median=median, p90=p90, clipped_fraction=clipped, count=int(norms.numel()))


def make_dp_optimizer(optimizer: torch.optim.Optimizer, config: DPSGDConfig) -> DPOptimizer:
    """Opacus's ``DPOptimizer`` around the job's optimizer: each patient's gradient clipped to ``max_grad_norm``,
    Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` added to their sum."""
    return DPOptimizer(
        optimizer,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=config.patients_per_step,
        loss_reduction="mean",
        generator=secure_generator() if config.secure_mode else None,
        secure_mode=config.secure_mode,
    )


def per_patient_grad_norms(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of each sample's gradient over all ``params`` (from Opacus's ``grad_sample``): what
    ``DPOptimizer`` clips. Parameters without per-sample gradients are skipped."""
    per_param = [p.grad_sample.reshape(p.grad_sample.shape[0], -1).norm(2, dim=1) for p in params if _has_samples(p)]
    if not per_param:
        return torch.zeros(0)
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def average_grad_samples_per_patient(params: list[torch.nn.Parameter], patients: int, patches: int) -> None:
    """Replace each parameter's per-patch ``grad_sample`` (``patients * patches`` rows, patient-major) by one row
    per patient: the mean of that patient's patch gradients, the gradient of the patient's mean patch loss.

    Why before clipping: ``DPOptimizer`` clips each row to ``max_grad_norm``; clipping patches separately would let
    a patient contribute ``patches`` times that. Averaged, the patient is one clipped row, as the accountant assumes.

    Raises:
        ValueError: a parameter's per-sample gradients do not have ``patients * patches`` rows.
    """
    for param in params:
        if not _has_samples(param):
            continue
        samples = param.grad_sample
        if samples.shape[0] != patients * patches:
            raise ValueError(
                f"per-sample gradients have {samples.shape[0]} rows, expected {patients} patient(s) x {patches} "
                f"patch(es)"
            )
        param.grad_sample = samples.reshape(patients, patches, *samples.shape[1:]).mean(dim=1)


def _has_samples(param: torch.nn.Parameter) -> bool:
    return torch.is_tensor(getattr(param, "grad_sample", None)) and param.grad_sample.shape[0] > 0


def _batch_size(batch) -> int:
    """Patients in a collated batch; Opacus returns an empty list or zero-length tensors for an empty sample."""
    if isinstance(batch, dict) and torch.is_tensor(batch.get("image")):
        return int(batch["image"].shape[0])
    return 0


def train_dpsgd(
    model: torch.nn.Module,
    items: list[dict],
    preprocessing: PreprocessConfig,
    config: DPSGDConfig,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    seed: int,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, float], None] | None = None,
    loss_fn: torch.nn.Module | None = None,
) -> tuple[TrainStats, Mechanism, RDPAccountant]:
    """Run ``config.steps_for(len(items))`` DP-SGD steps on ``model`` in place.

    Returns:
        Training statistics, the mechanism actually run (steps taken, for the ledger) and the Opacus accountant
        that watched the optimizer (its history is the same mechanism; tests compare the two).

    Raises:
        FloatingPointError: the loss became NaN or infinite.
        ValueError: the model has batch norm, or ``patients_per_step`` exceeds the site's patients.
    """
    planned = config.steps_for(len(items))
    loader = make_patient_loader(items, preprocessing, config, seed)
    sample_rate = loader.sample_rate
    grad_module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = make_dp_optimizer(optimizer, config)
    accountant = RDPAccountant()
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    loss_fn = (loss_fn or make_loss()).to(device)  # must be a mean of per-patch terms (see fedseg3d.training.loss)
    grad_module.train()
    started = time.perf_counter()
    steps, patches, loss_sum, loss_steps = 0, 0, 0.0, 0
    norms: list[torch.Tensor] = []
    try:
        while steps < planned and not should_stop():
            for batch in loader:
                if steps >= planned or should_stop():
                    break
                dp_optimizer.zero_grad(set_to_none=True)
                n = _batch_size(batch)
                if n == 0:
                    # Nobody sampled: the step still releases noise (and is accounted), with zero gradients.
                    for p in dp_optimizer.params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                    loss_value = float("nan")
                else:
                    # (patients, K, C, D, H, W) -> (patients * K, C, D, H, W), patient-major.
                    images = torch.as_tensor(batch["image"]).flatten(0, 1).to(device)
                    labels = torch.as_tensor(batch["label"]).flatten(0, 1).to(device)
                    loss = loss_fn(grad_module(images), labels)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"DP-SGD loss is {loss_value} at step {steps}: training diverged")
                    loss.backward()
                    if config.patches_per_patient > 1:
                        average_grad_samples_per_patient(dp_optimizer.params, n, config.patches_per_patient)
                    norms.append(per_patient_grad_norms(dp_optimizer.params))
                    loss_sum += loss_value
                    loss_steps += 1
                    patches += int(images.shape[0])
                dp_optimizer.step()
                steps += 1
                if progress is not None and n:
                    progress(steps, loss_value)
    finally:
        grad_module._close()  # remove Opacus hooks and per-sample attributes: the model is used plainly afterwards
    stats = TrainStats(
        mean_loss=loss_sum / loss_steps if loss_steps else math.nan,
        steps=steps,
        patches=patches,
        seconds=time.perf_counter() - started,
    )
    mechanism = patient_dpsgd_mechanism(config.noise_multiplier, config.patients_per_step, len(items), max(steps, 1))
    if steps == 0:
        logger.warning("DP-SGD took no step (stopped before the first); charging one step to be conservative")
    clip = ClipStatistics.of(torch.cat(norms) if norms else torch.zeros(0), config.max_grad_norm)
    if clip is not None:
        # Site log only: these are un-noised statistics of the private data (see ClipStatistics).
        logger.info(
            "DP-SGD per-patient gradient norms before clipping (site-local, never sent): median %.4g, 90th percentile "
            "%.4g over %d gradients; %.0f%% clipped at max_grad_norm=%g; %d patch(es) averaged per patient",
            clip.median,
            clip.p90,
            clip.count,
            100 * clip.clipped_fraction,
            config.max_grad_norm,
            config.patches_per_patient,
        )
    return stats, mechanism, accountant
