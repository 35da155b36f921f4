"""RunSpec: the YAML workload spec as pure pydantic models — data, no lookups, no I/O.

The spec is the only input of a run. What a single section can get wrong is checked here; loading,
overrides and the checks against the registry, storage, sweeps and pipelines are `bitfleet.resolve`'s.
Every error is one `SpecError` naming the field and what was expected.
"""
from __future__ import annotations

import graphlib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from bitfleet.errors import unknown_key_message
from bitfleet.paths import absolute_path, data_path

# Upper bounds of the counts a spec sets: far above any real run, low enough that no count overflows or
# exhausts memory before the run starts (a batch of 2**64 samples, 10**100 epochs).
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20  # samples in one (global) batch
MAX_WORKERS = 4096  # Ray Train workers of one run
MAX_STEPS = 10**9  # steps of an epoch, steps between checkpoints
Epochs = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


Section = SerializeAsAny[BaseModel]  # a typed section of another module's model, dumped with all its fields


class Strict(BaseModel):
    """Base of every spec section: unknown keys are errors, not silently ignored, and a boolean is not a
    number (pydantic reads `true` as 1 where a number is expected: `epochs: true` would train one epoch)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, raw: Any) -> Any:
        for name, value in raw.items() if isinstance(raw, dict) else ():
            field = cls.model_fields.get(name)
            if field is not None and _bool_as_number(field.annotation, value):
                raise ValueError(f"{name}: expected a number, not a boolean (got {value!r})")
        return raw


def _bool_as_number(annotation: Any, value: Any) -> bool:
    """Whether validating `value` as `annotation` would read a boolean in it (or in its items) as a number."""
    members = _members(annotation)
    if isinstance(value, bool):
        kinds = {type(v) for m in members if get_origin(m) is Literal for v in get_args(m)}
        kinds |= {m for m in members if get_origin(m) is not Literal}
        return bool(kinds & {int, float}) and not kinds & {bool, Any}
    for member in members:
        origin, args = get_origin(member), get_args(member)
        if isinstance(value, (list, tuple)) and origin in (list, tuple) and args:
            items = args if origin is tuple and args[-1] is not Ellipsis else [args[0]] * len(value)
            if any(_bool_as_number(item, v) for item, v in zip(items, value)):
                return True
        if isinstance(value, dict) and origin is dict and any(_bool_as_number(args[1], v) for v in value.values()):
            return True
    return False


def _members(annotation: Any) -> tuple:
    """The types a value of `annotation` may be: a union's members, each unwrapped of `Annotated`."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(m for arg in get_args(annotation) for m in _members(arg))
    return (annotation,)


class ParamGroup(Strict):
    """Parameters whose dotted name matches one of `match` (fnmatch globs) get these multipliers."""

    name: str
    match: list[str] = Field(min_length=1)
    lr_mult: float = Field(1.0, ge=0)
    weight_decay_mult: float = Field(1.0, ge=0)


class OptimizerSpec(Strict):
    type: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    param_groups: list[ParamGroup] = []


class LRScheduleSpec(Strict):
    """Learning-rate schedule over epochs; applied per step so warmup and cosine are smooth."""

    type: Literal["constant", "step", "multistep", "cosine", "linear"] = "multistep"  # linear: decay to min_lr
    milestones: list[Epochs] = [100, 150]  # multistep, in epochs
    step_size: int = Field(30, ge=1, le=MAX_EPOCHS)  # step, in epochs
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)  # cosine and linear floor
    warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    warmup_start_factor: float = Field(0.01, gt=0, le=1)


class EMASpec(Strict):
    """An exponential moving average of the parameters (engine/ema.py), evaluated beside the trained weights
    as `ema/<split>/*`."""

    decay: float = Field(0.999, gt=0, lt=1)
    warmup: bool = False  # decay ramped as min(decay, (1 + t) / (10 + t)) at the t-th update (TensorFlow's)
    # the EMA is the run's result: its metrics rank the checkpoints, its weights are exported and start later
    # stages (init_from); false: the trained weights are, and the EMA is only reported
    evaluate: bool = True


class EarlyStoppingSpec(Strict):
    """End the run once `metric` has not improved by more than `min_delta` (its own units: accuracy points,
    loss) for `patience` epochs in a row (engine/early_stopping.py)."""

    patience: int = Field(ge=1, le=MAX_EPOCHS)
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False)
    metric: str | None = None  # None: the metric that ranks the checkpoints (failure.checkpoint_metric, ...)
    mode: Literal["max", "min"] | None = None  # None: the direction the objective knows


class DeepSpeedSpec(Strict):
    """`train.strategy: deepspeed`: ZeRO partitions the optimizer state (stage 1), and the gradients too (2),
    over the workers. `config` holds further DeepSpeed config keys (zero_optimization.overlap_comm,
    reduce_bucket_size, ...); the keys that other spec fields own are derived from them, never set here."""

    zero_stage: Literal[1, 2] = 1
    config: dict[str, Any] = {}

    @field_validator("config")
    @classmethod
    def _owned_keys(cls, config):
        for key, owner in DEEPSPEED_OWNED.items():
            section, _, leaf = key.partition(".")
            if section in config and (not leaf or leaf in (config[section] or {})):
                raise ValueError(f"{key} is set by {owner}; remove it from train.deepspeed.config")
        return config


DEEPSPEED_OWNED = {  # DeepSpeed config key -> the spec field it comes from
    "train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.batch_size", "optimizer": "train.optimizer",
    "scheduler": "train.lr_schedule", "gradient_clipping": "train.grad_clip", "fp16": "train.amp",
    "bf16": "train.amp", "torch_autocast": "train.amp", "zero_optimization.stage": "train.deepspeed.zero_stage",
    "checkpoint": "bitfleet's checkpoints (engine/checkpoint.py)",
}


class TrainSpec(Strict):
    epochs: int = Field(200, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)  # global: split evenly over the workers
    eval_batch_size: int = Field(512, ge=1, le=MAX_BATCH)
    optimizer: OptimizerSpec = OptimizerSpec()
    lr_schedule: LRScheduleSpec = LRScheduleSpec()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: bool | Literal["gpu"] = False  # gpu: on GPU workers only, as the seeds' torch.cuda.amp
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"  # auto: bf16 on CPU, fp16 on CUDA
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm
    ema: EMASpec | None = None
    early_stopping: EarlyStoppingSpec | None = None
    print_freq: int = Field(100, ge=1, le=MAX_STEPS)  # a progress line (loss, lr, images/s, ETA) every N steps
    max_steps_per_epoch: int | None = Field(None, ge=1, le=MAX_STEPS)  # quick checks
    max_eval_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedSpec | None = None  # strategy deepspeed: its settings (default: ZeRO stage 1)
    compile: bool = False  # torch.compile the training forward; checkpoints keep the module's own keys
    channels_last: bool = False  # conv weights and 4-D training batches in torch.channels_last (NHWC) layout
    init_from: str | None = None  # a checkpoint folder, or a run folder (its best checkpoint): initial weights
    resume_from: str | None = None  # a checkpoint folder whose whole state (epoch, optimizer, ...) a new run
    #                                  continues, with this spec's values (PBT exploits, sweep trial restarts)

    _init_from_absolute = field_validator("init_from", "resume_from")(absolute_path)

    @model_validator(mode="after")
    def _strategy(self):
        if self.deepspeed is not None and self.strategy != "deepspeed":
            raise ValueError(f"deepspeed: settings for `strategy: deepspeed`, but strategy is {self.strategy!r}")
        if self.compile and self.strategy == "deepspeed":  # its engine's forward runs DeepSpeed's own hooks
            raise ValueError("compile: not with strategy deepspeed (its engine wraps the forward in ZeRO's hooks, "
                             "which bitfleet does not compile): use strategy ddp, or compile: false")
        return self


FolderDataset = Literal["imagenet", "tinyimagenet", "image_folder"]  # JPEG class folders: <root>/{train,val}/<class>/
FOLDER_DATASETS = FolderDataset.__args__


class DataSpec(Strict):
    dataset: Literal["mnist_sample", "mnist", "cifar10", "cifar100"] | FolderDataset = "cifar10"
    root: str | None = None  # required for every dataset but the embedded mnist_sample; see `data_path`
    loader: Literal["torchvision", "dali"] = "torchvision"  # dali: JPEG folders only, `pip install bitfleet[dali]`
    augment: bool = True
    random_rotation: float = Field(0.0, ge=0, le=180)  # train augmentation (mnist, cifar): +- degrees; 0: none
    loader_workers: int = Field(0, ge=0, le=256)  # DataLoader processes (or DALI threads) per training worker
    crop_size: int | None = Field(None, ge=8, le=8192)  # folder data sets: train and eval crop (224; tinyimagenet 64)
    resize_size: int | None = Field(None, ge=8, le=8192)  # eval: shorter side before the centre crop (crop / 0.875)
    crop_area: tuple[float, float] = (0.08, 1.0)  # train: random-resized-crop area fraction
    val_size: int = Field(0, ge=0, le=10**9)  # images held out of the training set and evaluated as `val/*`
    split_seed: int = 42
    stratified: bool = True  # the held-out images in proportion to each class

    _root_absolute = field_validator("root")(data_path)

    @model_validator(mode="after")
    def _check(self):
        if self.dataset != "mnist_sample" and not self.root:
            raise ValueError(f"root: dataset {self.dataset!r} needs `data.root`, the folder that holds it")
        folders = self.dataset in FOLDER_DATASETS
        if self.loader == "dali" and not folders:
            raise ValueError(f"loader: dali reads JPEG class folders ({', '.join(FOLDER_DATASETS)}); "
                             f"dataset {self.dataset!r} loads with `loader: torchvision`")
        for field in ("crop_size", "resize_size"):
            if getattr(self, field) is not None and not folders:
                raise ValueError(f"{field}: applies to {', '.join(FOLDER_DATASETS)}; {self.dataset!r} has a fixed size")
        if self.random_rotation and folders:
            raise ValueError(f"random_rotation: applies to mnist and cifar; {self.dataset!r} is augmented by its "
                             "random-resized crop")
        if folders and self.eval_resize < self.crop:
            raise ValueError(f"resize_size: {self.eval_resize} is smaller than crop_size {self.crop}")
        low, high = self.crop_area
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_area: expected 0 < min <= max <= 1 (got {list(self.crop_area)})")
        return self

    @property
    def crop(self) -> int:
        """The side of the square images the model sees (folder data sets)."""
        return self.crop_size or (64 if self.dataset == "tinyimagenet" else 224)

    @property
    def eval_resize(self) -> int:
        if self.resize_size:
            return self.resize_size
        return self.crop if self.dataset == "tinyimagenet" else round(self.crop / 0.875)  # 224 -> 256


class ScalingSpec(Strict):
    # a number, or [min, max]: elastic. Ray Train starts the group with as many workers as fit, restarts it
    # smaller after a node is lost, and grows it back (from the latest checkpoint) when room returns.
    num_workers: int | tuple[int, int] = 1
    resize_check_s: float = Field(60.0, gt=0, le=86_400)  # elastic: how often a healthy group looks for room to grow
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    resources_per_worker: dict[str, Annotated[float, Field(ge=0)]] = {}  # extra custom resources

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high <= MAX_WORKERS:
            raise ValueError(f"expected a number of workers from 1 to {MAX_WORKERS}, or [min, max] with "
                             f"1 <= min <= max <= {MAX_WORKERS}")
        return value

    @property
    def worker_range(self) -> tuple[int, int]:
        return (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]


class FailureSpec(Strict):
    max_failures: int = Field(3, ge=-1, le=10_000)  # worker-group restarts before the run fails; -1: unlimited
    checkpoint_every: int = Field(1, ge=1, le=MAX_EPOCHS)  # epochs
    # mid-epoch checkpoints too: every N global steps, and after N minutes without one (None: off)
    checkpoint_every_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    checkpoint_every_minutes: float | None = Field(30.0, gt=0, le=7 * 24 * 60)
    preemption_grace_s: float = Field(30.0, gt=0, le=3600)  # a SIGTERMed worker exits by then
    # async: Ray uploads a checkpoint to storage while training goes on (sync for the last one, a stop, a
    # preemption: the group is about to end); sync: training waits for every upload
    upload: Literal["async", "sync"] = "async"
    keep: int = Field(2, ge=1, le=1000)  # checkpoints kept: the best by checkpoint_metric, and always the latest
    checkpoint_metric: str | None = None  # ranks checkpoints; None: the objective's own, on val if held out
    checkpoint_mode: Literal["max", "min"] | None = None  # None: the direction the objective knows


class MLflowSpec(Strict):
    """Each run (and each trial of a sweep) as an MLflow run: its resolved spec as params, its metrics."""

    uri: str = Field(min_length=1)  # MLflow's tracking URI: http://host:5000, sqlite:///mlflow.db, a folder
    experiment: str | None = None  # default: the run's name (a sweep's: the sweep's name)


class TrackingSpec(Strict):
    tensorboard: bool = True  # event files in <run>/tensorboard: epoch metrics, progress, histograms
    mlflow: MLflowSpec | None = None  # `pip install bitfleet[mlflow]`


class StageSpec(Strict):
    """One stage of a pipeline: the pipeline's spec with `overrides`, run after the stages it `needs`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    needs: list[str] = []
    task: str | None = None  # None: a Ray Train run; else `report` or one of the workload's tasks
    init_from: str | None = None  # a needed stage whose best checkpoint gives the initial weights
    overrides: dict[str, Any] = {}  # dotted spec paths -> values, e.g. {train.epochs: 10}


class TrialOf(Strict):
    """Set by `bitfleet sweep` on each trial's spec: its metrics are labelled by sweep and trial."""

    sweep: str
    trial: str


class RunSpec(Strict):
    """A whole run. The workload's own section is a top-level key named after the workload.

    As written, `model`, the workload's section and `sweep` are raw mappings; `bitfleet.resolve` parses
    each of them once, into the workload's `ModelConfig` and `Options` and a `SweepSpec`, and the resolved
    spec carries those typed models to the driver's scheduler and to every worker.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    workload: str
    model: dict[str, Any] | Section = {}  # resolved: the workload's ModelConfig
    data: DataSpec
    train: TrainSpec = TrainSpec()
    scaling: ScalingSpec = ScalingSpec()
    failure: FailureSpec = FailureSpec()
    storage_path: str = Field("~/bitfleet_results", validate_default=True)
    seed: int = Field(0, ge=0)
    # the paper's numbers (or an expected [low, high]) by metric, for reports; null: no published figure exists
    targets: dict[str, float | tuple[float, float] | None] = {}
    tracking: TrackingSpec = TrackingSpec()
    stages: list[StageSpec] = Field([], max_length=100)  # a pipeline: `bitfleet run` runs them in order
    inputs: dict[str, str] = {}  # set by the pipeline: needed stage -> its run folder (artifacts)
    trial_of: TrialOf | None = None
    sweep: dict[str, Any] | Section | None = None  # `bitfleet sweep`; resolved: a bitfleet.sweeps.SweepSpec

    _storage_absolute = field_validator("storage_path")(absolute_path)

    @model_validator(mode="after")
    def _check(self):
        extras = set(self.model_extra or {}) - {self.workload}
        if extras:
            raise ValueError(unknown_key_message(sorted(extras)[0], type(self).model_fields, self.workload))
        section = (self.model_extra or {}).get(self.workload)
        if section is not None and not isinstance(section, (dict, BaseModel)):
            raise ValueError(f"{self.workload}: expected a mapping of the workload's options (got {section!r})")
        _check_stages(self.stages)
        if (self.stages or self.sweep is not None) and "://" in self.storage_path:
            raise ValueError(f"storage_path: {self.storage_path} is a URI; single runs write there, but sweeps and "
                             "pipelines keep their trials' and stages' folders on a filesystem: use a folder mounted "
                             "at the same path on every node")
        low, high = self.scaling.worker_range
        if self.train.strategy == "deepspeed" and low != high:
            raise ValueError(f"scaling.num_workers: {list(self.scaling.num_workers)} is elastic, but DeepSpeed's "
                             "optimizer shards are cut for one world size: give a fixed number with strategy deepspeed")
        uneven = [n for n in range(low, high + 1) if self.train.batch_size % n]
        if uneven:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} is the global batch and must divide evenly "
                f"over scaling.num_workers={self.scaling.num_workers} (not over {uneven[0]} workers)"
            )
        return self

    @property
    def options(self) -> Any:
        """The workload's own section (`rbnn: {...}` for workload rbnn): raw as written, typed once resolved."""
        section = (self.model_extra or {}).get(self.workload)
        return {} if section is None else section

    @property
    def run_dir(self) -> Path:
        """The run's folder where `storage_path` is a folder (`bitfleet.storage.run_path` for URIs too)."""
        return Path(self.storage_path) / self.name


def _check_stages(stages: list[StageSpec]) -> None:
    names = [stage.name for stage in stages]
    for i, stage in enumerate(stages):
        where = f"stages.{i}"
        if stage.name in names[:i]:
            raise ValueError(f"{where}.name: {stage.name!r} names two stages")
        unknown = [need for need in stage.needs if need not in names or need == stage.name]
        if unknown:
            raise ValueError(f"{where}.needs: {unknown[0]!r} is not another stage (stages: {', '.join(names)})")
        if stage.init_from and stage.init_from not in stage.needs:
            raise ValueError(f"{where}.init_from: {stage.init_from!r} must be one of the stages it needs {stage.needs}")
    try:
        tuple(graphlib.TopologicalSorter({s.name: s.needs for s in stages}).static_order())
    except graphlib.CycleError as exc:
        raise ValueError(f"stages: the needs form a cycle ({' -> '.join(exc.args[1])})") from None
