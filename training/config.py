"""Training configuration: one TOML file per model, validated with clear messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.configfile import ConfigError, build, read_toml
from edge.paths import shared_dir

__all__ = ["ConfigError", "Config", "load_config"]

BACKBONES = ("mobilenetv2", "mobilenet_edgetpu", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2", "inceptionv3", "small_cnn")
SAMPLING = ("none", "sqrt", "balanced")
# The card's targets: minimums on the test split's figures, the maximums below, and per class
# "recall_<label>" (top-1) or "referred_<label>" (sent on by the decision rule).
TARGETS = ("accuracy", "balanced_accuracy", "macro_auc", "group_auc", "sensitivity",
           "specificity", "specificity_at_target", "max_latency_ms", "max_int8_drop",
           "min_agreement", "max_int8_mb")


@dataclass
class DatasetConfig:
    layout: str
    root: str
    labels: list[str]
    label_names: dict[str, str] = field(default_factory=dict)
    seed: int = 42
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    limit_per_class: int = 0  # 0: all images; tests use a few dozen
    csv: str = ""
    citation: str = ""
    license: str = ""
    source: str = ""
    # What the images are (the bundle's "imaging": the DICOM object results are exported as):
    # microscopy, dermoscopy or photography; empty: dermoscopy for ham10000, else microscopy.
    imaging: str = ""

    @property
    def root_path(self) -> Path:
        p = Path(self.root)
        return p if p.is_absolute() else shared_dir() / p


@dataclass
class DecisionConfig:
    group: str
    groups: dict[str, list[str]]
    target_sensitivity: float = 0.9
    # How the threshold is chosen on the validation split: "validation" (the threshold that
    # reaches the target there) or "lesion_bound" (lesions resampled with replacement; the
    # threshold that reaches the target in threshold_confidence of the resamples), so that the
    # target holds on new lesions rather than on the validation images' luck.
    threshold_method: str = "validation"
    threshold_confidence: float = 0.95
    # With out-of-fold scores (`ensemble --oof-scores`): "score" uses the threshold chosen on
    # them as it is; "specificity" carries their operating point over instead: the fold models'
    # specificity at that threshold, applied as a quantile of the kit's own benign validation
    # scores (for fold models whose scores sit on another scale than the shipped models').
    oof_carry: str = "score"
    positive: str = "refer"
    negative: str = "no referral"
    # What the kit calls an image the scope check rejects, and what the live page says while
    # nothing it was made for is in view.
    out_of_scope: str = "not an image for this model"
    nothing_in_view: str = "nothing to classify in view"


@dataclass
class ModelConfig:
    backbone: str = "mobilenetv2"
    weights: str = "coral"  # coral | imagenet | none | path to a .weights.h5 file
    # One number for a square input, or [height, width] to keep the images' own aspect ratio
    # (HAM10000 is 4:3, so [168, 224] rather than upsampling a crop).
    input_size: int | list[int] = 224
    dropout: float = 0.2
    dense: int = 128

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        if isinstance(self.input_size, int):
            return self.input_size, self.input_size
        return int(self.input_size[0]), int(self.input_size[1])


@dataclass
class TrainConfig:
    batch_size: int = 32
    head_epochs: int = 5
    head_lr: float = 1e-3
    finetune_epochs: int = 6
    finetune_lr: float = 1e-4
    # The first layer that trains in phase 2; "all" trains every layer (BatchNorm excepted,
    # whose transplanted statistics stay fixed: see training/model.py).
    unfreeze_from: str = "block_13_expand"
    patience: int = 3
    augment: bool = True
    # Also turn training images by any angle in phase 2 on images (for subjects with no 'up').
    rotate: bool = False
    class_weight: str = "balanced"  # balanced | sqrt | none
    # How phase 2 draws training images: "none" as they come; "balanced" every class equally
    # often; "sqrt" each class in proportion to the square root of its count (rare classes seen
    # far more often without drowning the common ones). With sampling on, class_weight is ignored
    # in phase 2 (the two would count the imbalance twice).
    sampling: str = "none"
    # Soft labels from a teacher (training/gpu_teacher.py), relative to this config file's
    # folder: phase 2 learns from (1 − soft_weight) × one-hot + soft_weight × teacher. "" = off.
    soft_labels: str = ""
    soft_weight: float = 0.5
    # Learning-rate warm-up steps at the start of phase 2 (whole-network training starts with a
    # random head on a pretrained body; a cold start at the full rate disturbs the body).
    warmup_steps: int = 0
    # > 0: phase 2 on images validates, keeps and exports an exponential moving average of the
    # weights (Polyak averaging, this momentum per step) rather than the last step's weights:
    # with BatchNorm frozen the average needs no new statistics. 0 = off.
    ema_momentum: float = 0.0
    # > 0: phase 2 trains the layers from unfreeze_from on this many augmented copies of the
    # activations at that layer, computed once (the frozen bottom runs K times, not every epoch).
    cached_copies: int = 0
    # > 0 (needs cached_copies): then this many epochs with int8 activations simulated (see
    # training/qat.py), at qat_lr, before the float weights are exported.
    qat_epochs: int = 0
    qat_lr: float = 3e-5
    # > 0 (needs cached_copies): this many more augmented copies whose activations come from the
    # int8 bottom (calibrated like the export), and validation on int8 activations, so the top
    # learns to answer the same for the float and the int8 bottom (see training/cached.py).
    int8_copies: int = 0
    # Seed of the weights' initialisation, the sampling and the augmentation; -1 = the
    # dataset's seed. Another value trains another ensemble member on the same split.
    seed: int = -1

    def run_seed(self, dataset_seed: int) -> int:
        """The seed training uses (the split always uses the dataset's)."""
        return dataset_seed if self.seed < 0 else self.seed

    @property
    def soft_labels_path(self) -> Path:
        """``soft_labels`` resolved against the config file's folder (set by load_config)."""
        p = Path(self.soft_labels)
        return p if p.is_absolute() else getattr(self, "base_dir", Path(".")) / p


@dataclass
class ExportConfig:
    representative_images: int = 200
    int8: bool = True
    float: bool = True
    intended_use: str = ""
    limitations: list[str] = field(default_factory=list)
    edgetpu_runtime_version: int = 14
    # "logits": the artifacts end before the softmax (the edge applies it in float), which keeps
    # the int8 group scores fine-grained; "probabilities": they end with the softmax.
    output: str = "probabilities"
    # Test-time views the bundle offers (manifest "tta"): uploads, captures and classify --tta
    # average the model over them; the live stream does not. [] = none.
    tta: list[str] = field(default_factory=list)
    # "tuned": add a per-class bias to the logits (logit adjustment, −τ·log class prior) with τ
    # chosen on validation for the mean of accuracy and balanced accuracy (needs output =
    # "logits"): the rare classes are then predicted as often as they should be. "none": off.
    class_bias: str = "none"
    # Earlier runs for the card's table of what was tried: each a table with the keys
    # run, backbone, input, schedule, balancing, tta, and the figures it gave.
    runs: list[dict] = field(default_factory=list)
    # Acceptance targets for the int8 artifact on the test split, reported in the model card
    # (TARGETS names them; an unknown key is refused, not ignored).
    targets: dict[str, float] = field(default_factory=dict)
    gap_notes: list[str] = field(default_factory=list)  # what would close a missed target
    # The scope check (training/scope.py): layers whose feature maps become extra outputs of
    # the int8 model (an early one for texture and colour, the last one for the maps), the
    # share of in-scope validation images it must accept, and the other use's config (its
    # images are one of the out-of-scope sets reported). [] = no scope check.
    scope_layers: list[str] = field(default_factory=list)
    scope_acceptance: float = 0.97
    scope_other: str = ""


@dataclass
class Config:
    name: str
    version: str
    description: str
    dataset: DatasetConfig
    decision: DecisionConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = ""


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> Config:
    path = Path(path)
    raw = read_toml(path)
    for dotted, value in (overrides or {}).items():
        table, _, key = dotted.rpartition(".")
        target = raw
        for part in filter(None, table.split(".")):
            target = target.setdefault(part, {})
        target[key] = value
    for required in ("name", "version", "dataset", "decision"):
        if required not in raw:
            raise ConfigError(f"{path}: missing {required!r}")
    cfg = Config(
        name=raw["name"],
        version=str(raw["version"]),
        description=raw.get("description", ""),
        dataset=build(DatasetConfig, raw["dataset"], f"{path} [dataset]"),
        decision=build(DecisionConfig, raw["decision"], f"{path} [decision]"),
        model=build(ModelConfig, raw.get("model", {}), f"{path} [model]"),
        train=build(TrainConfig, raw.get("train", {}), f"{path} [train]"),
        export=build(ExportConfig, raw.get("export", {}), f"{path} [export]"),
        source=str(path),
    )
    cfg.train.base_dir = path.resolve().parent
    _check(cfg, path)
    return cfg


def _check(cfg: Config, path: Path) -> None:
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(
            f"{path} [model] backbone: {cfg.model.backbone!r} is not one of {BACKBONES}"
        )
    size = cfg.model.input_size
    if isinstance(size, bool) or not (
        isinstance(size, int)
        or (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size))
    ):
        raise ConfigError(
            f"{path} [model] input_size must be a number or [height, width], not {size!r}"
        )
    if not all(32 <= v <= 512 for v in cfg.model.hw):
        raise ConfigError(f"{path} [model] input_size must be between 32 and 512")
    if cfg.train.soft_labels:
        if cfg.train.cached_copies:
            raise ConfigError(f"{path} [train] soft_labels works on images: set cached_copies = 0")
        if not Path(cfg.train.soft_labels_path).is_file():
            raise ConfigError(
                f"{path} [train] soft_labels: {cfg.train.soft_labels_path} not found",
                'make it with training/gpu_teacher.py, or set soft_labels = ""',
            )
    if not 0 <= cfg.train.soft_weight <= 1:
        raise ConfigError(f"{path} [train] soft_weight must be between 0 and 1")
    if not 0 <= cfg.train.ema_momentum < 1:
        raise ConfigError(f"{path} [train] ema_momentum must be at least 0 (off) and below 1")
    if cfg.train.ema_momentum and cfg.train.cached_copies:
        raise ConfigError(f"{path} [train] ema_momentum works on images: set cached_copies = 0")
    if cfg.train.ema_momentum and not cfg.train.finetune_epochs:
        raise ConfigError(
            f"{path} [train] ema_momentum averages the whole-network phase: finetune_epochs is 0"
        )
    if cfg.train.sampling not in SAMPLING:
        raise ConfigError(f"{path} [train] sampling must be one of {SAMPLING}")
    if cfg.train.sampling != "none" and cfg.train.cached_copies:
        raise ConfigError(f"{path} [train] sampling works on images: set cached_copies = 0")
    if cfg.train.unfreeze_from == "all" and cfg.train.cached_copies:
        raise ConfigError(f"{path} [train] unfreeze_from = 'all' leaves nothing to cache")
    if cfg.decision.group not in cfg.decision.groups:
        raise ConfigError(f"{path} [decision] group {cfg.decision.group!r} is not in groups")
    for g, members in cfg.decision.groups.items():
        bad = sorted(set(members) - set(cfg.dataset.labels))
        if bad:
            raise ConfigError(f"{path} [decision] groups.{g}: {bad} are not dataset labels")
    fr = cfg.dataset.fractions
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) <= 0:
        raise ConfigError(f"{path} [dataset] fractions must be three positive numbers summing to 1")
    if cfg.train.class_weight not in ("balanced", "sqrt", "none"):
        raise ConfigError(f"{path} [train] class_weight must be balanced, sqrt or none")
    if not 0 <= cfg.train.cached_copies <= 32:
        raise ConfigError(f"{path} [train] cached_copies must be between 0 (off) and 32")
    if cfg.export.output not in ("probabilities", "logits"):
        raise ConfigError(f"{path} [export] output must be probabilities or logits")
    if cfg.train.qat_epochs and not cfg.train.cached_copies:
        raise ConfigError(f"{path} [train] qat_epochs needs cached_copies > 0")
    if not 0 <= cfg.train.int8_copies <= 32:
        raise ConfigError(f"{path} [train] int8_copies must be between 0 (off) and 32")
    if cfg.train.int8_copies and not cfg.train.cached_copies:
        raise ConfigError(f"{path} [train] int8_copies needs cached_copies > 0")
    from edge.inference.preprocess import TTA_VIEWS

    if cfg.export.class_bias not in ("none", "tuned"):
        raise ConfigError(f"{path} [export] class_bias must be none or tuned")
    if cfg.export.class_bias == "tuned" and cfg.export.output != "logits":
        raise ConfigError(f"{path} [export] class_bias = 'tuned' needs output = 'logits'")

    bad = [v for v in cfg.export.tta if v not in TTA_VIEWS]
    if bad or (cfg.export.tta and len(set(cfg.export.tta)) != len(cfg.export.tta)):
        raise ConfigError(
            f"{path} [export] tta: {bad or 'repeated views'}; use distinct views from "
            f"{sorted(TTA_VIEWS)}"
        )
    h, w = cfg.model.hw
    if h != w and {"rot90", "rot270"}.intersection(cfg.export.tta):
        raise ConfigError(f"{path} [export] tta: rot90/rot270 need a square input ({h}×{w})")
    if cfg.decision.threshold_method not in ("validation", "lesion_bound"):
        raise ConfigError(f"{path} [decision] threshold_method: "
                          f"{cfg.decision.threshold_method!r} is not validation or lesion_bound")
    if cfg.decision.oof_carry not in ("score", "specificity"):
        raise ConfigError(f"{path} [decision] oof_carry: {cfg.decision.oof_carry!r} is not "
                          "score or specificity")
    if not 0.5 <= cfg.decision.threshold_confidence < 1:
        raise ConfigError(f"{path} [decision] threshold_confidence must be in [0.5, 1)")
    if not 0 < cfg.decision.target_sensitivity <= 1:
        raise ConfigError(f"{path} [decision] target_sensitivity must be in (0, 1]")
    for key in cfg.export.targets:
        prefix, _, label = key.partition("_")
        per_class = prefix in ("recall", "referred") and label in cfg.dataset.labels
        if key not in TARGETS and not per_class:
            raise ConfigError(
                f"{path} [export.targets] {key!r} is not a target: use one of "
                f"{', '.join(TARGETS)}, or recall_<label> / referred_<label> for a dataset "
                "label")
