"""The default config tree. Every key has a comment; yaml files and ``KEY VALUE`` overrides change it.

Use :func:`msgc.config.get_cfg` to get a copy; never edit ``_C`` in place.
"""
from .config import CfgNode as CN

_C = CN()

# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Device the model is built on: "cuda" or "cpu" ("cuda:1" etc. also work in a single process).
_C.MODEL.DEVICE = "cuda"
# Weights to start from: this project's checkpoint, a torchvision state dict or an original MSGC
# release checkpoint (path or URL; the format is recognised from the file's contents). "" = none.
_C.MODEL.WEIGHTS = ""
# Number of classes of the classifier head.
_C.MODEL.NUM_CLASSES = 1000
# Label smoothing of the classification loss (the reference uses 0.1).
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.BACKBONE = CN()
# Registered backbone name (see msgc.modeling.BACKBONE_REGISTRY), e.g. "msgc_resnet18".
_C.MODEL.BACKBONE.NAME = "msgc_resnet18"
# Width multiplier of the host network's channels (1.0 = the paper's networks).
_C.MODEL.BACKBONE.WIDTH_MULT = 1.0
# Stem: "imagenet" (the host's stride-4 stem) or "cifar" (3x3 conv with stride 1, no max-pool; for
# small images such as CIFAR or the digits quickstart).
_C.MODEL.BACKBONE.STEM = "imagenet"

_C.MODEL.MSGC = CN()
# Registered grouping name (msgc.modeling.GROUPING_REGISTRY): "msgc" (the paper), "prune" (one head:
# dynamic channel pruning), "static" (fixed grouped convolution), "dense" (the host network) or
# "msgc_heads" (an ablation: msgc's head masks only, the single-head input masks left out).
_C.MODEL.MSGC.GROUPING = "msgc"
# Registered attention name (msgc.modeling.ATTENTION_REGISTRY): "none" or "channel".
_C.MODEL.MSGC.ATTENTION = "none"
# Number of heads (groups) of each gated convolution; must divide the channel counts it gates.
_C.MODEL.MSGC.HEADS = 4
# Temperature of the gates' logistic-noise relaxation (the reference's eps = 2/3).
_C.MODEL.MSGC.TEMPERATURE = 0.6666666666666666
# Initial bias of the mask generators' last convolution: 2.0 opens nearly all gates at the start.
_C.MODEL.MSGC.GATE_BIAS = 2.0
# Weight lambda of the sparsity loss: lambda * (batch mean MACs / dense MACs - target) while the
# batch is above the current target, else 0.
_C.MODEL.MSGC.LOSS_WEIGHT = 30.0
# One model for every MAC budget of a range: [lo, hi] with 0 < lo < hi <= 1 makes the MAC budget an
# input of the mask generators (msgc.modeling.layers.MaskGenerator), and training samples one budget
# per batch from the range (lo and hi every third batch each, uniform otherwise) with the MAC target
# aimed at it (SOLVER.MAC_TARGET's schedule, ending at the sampled budget instead of FINAL). At
# inference the budget is chosen with TEST.BUDGET, msgc.modeling.set_budget or deploy(..., budget=).
# [] = the paper's generators, one budget per training (SOLVER.MAC_TARGET.FINAL).
_C.MODEL.MSGC.BUDGET_RANGE = []

# ---------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------
_C.INPUT = CN()
# Side of the square training crop (RandomResizedCrop).
_C.INPUT.TRAIN_SIZE = 224
# Smallest scale of RandomResizedCrop's area range (torchvision's default 0.08).
_C.INPUT.MIN_SCALE = 0.08
# Horizontal flip during training.
_C.INPUT.RANDOM_FLIP = True
# Test: resize the shorter side to this, then center-crop TEST_SIZE.
_C.INPUT.TEST_RESIZE = 256
# Side of the square test crop.
_C.INPUT.TEST_SIZE = 224
# Per-channel mean and std (RGB, in [0, 1] units) of the normalisation. The loaders hand uint8 images;
# msgc.data.Normalizer normalises them on the model's device (in the training step and the evaluation).
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
# Where image files' JPEGs are decoded: "cpu" (torchvision.io in the DataLoader workers) or "cuda"
# (nvjpeg on this process's GPU, in the training process: needs DATALOADER.NUM_WORKERS 0; untested on a
# GPU by this project). Only image-folder datasets (imagenet, imagefolder) decode files.
_C.INPUT.DECODE_DEVICE = "cpu"

# ---------------------------------------------------------------------------------------------------
# Datasets and loader
# ---------------------------------------------------------------------------------------------------
_C.DATASETS = CN()
# Registered dataset name for training (see msgc.data.DATASET_REGISTRY).
_C.DATASETS.TRAIN = "imagenet"
# Registered dataset name for evaluation.
_C.DATASETS.TEST = "imagenet"
# Root folder of the dataset (for "imagenet": a folder with train/ and val/).
_C.DATASETS.ROOT = "datasets/imagenet"
# Keys of the "synthetic" dataset (random images for smoke tests and benchmarks):
# Number of images of its train split.
_C.DATASETS.SYNTHETIC_LENGTH = 64
# Number of images of its test split.
_C.DATASETS.SYNTHETIC_TEST_LENGTH = 64

_C.DATALOADER = CN()
# Worker processes per data loader (per training process), at most the CPU cores of the machine divided
# by its processes: more is lowered to that, with a warning. 0 loads in the training process.
_C.DATALOADER.NUM_WORKERS = 4
# Corrupt image files (not an image, truncated): False stops with a one-line error naming the file;
# True replaces each by the next readable sample, with a warning naming it and a count in the log.
_C.DATALOADER.SKIP_CORRUPT = False

# ---------------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------------
_C.SOLVER = CN()
# Total training iterations.
_C.SOLVER.MAX_ITER = 600000
# Global batch size over all processes; must be divisible by the number of processes.
_C.SOLVER.IMS_PER_BATCH = 256
# Learning rate of the gate group (SOLVER.GATE_KEYWORDS); the host gets BASE_LR * PRETRAINED_LR_MULT.
_C.SOLVER.BASE_LR = 0.075
# Multiplier of BASE_LR for the (pretrained) host network's parameters.
_C.SOLVER.PRETRAINED_LR_MULT = 0.2
# SGD momentum and Nesterov.
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = True
# Weight decay of the host's convolution and linear weights.
_C.SOLVER.WEIGHT_DECAY = 1e-4
# Weight decay of normalisation layers' parameters.
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
# Weight decay of the gate group's parameters (see GATE_KEYWORDS).
_C.SOLVER.WEIGHT_DECAY_GATES = 0.0
# A parameter whose name contains one of these trains in the gate group (BASE_LR, WEIGHT_DECAY_GATES);
# the others train with the host (BASE_LR x PRETRAINED_LR_MULT; WEIGHT_DECAY_NORM for normalisation
# layers, WEIGHT_DECAY for the rest). ("mask",) is the reference's rule, which the paper's configs use:
# the mask generators are gates, the attention generators train with the host. The default also makes
# the attention generators ("attgen") gates: msgc's choice, kept for the non-paper configs.
_C.SOLVER.GATE_KEYWORDS = ("mask", "attgen")
# LR schedule (registered in msgc.solver.SCHEDULER_REGISTRY): "cosine" (a half-cosine that moves every
# iteration), "cosine_epoch" (the paper's: the half-cosine's value at each epoch's start, held for the
# epoch), "multistep", "linear", "constant".
_C.SOLVER.LR_SCHEDULER_NAME = "cosine"
# Iterations per epoch of the schedules that step by epoch ("cosine_epoch"): the epoch count is
# MAX_ITER / ITERS_PER_EPOCH. 0 derives it from the training set: ceil(images / IMS_PER_BATCH), which
# builds the DATASETS.TRAIN dataset to count it (ImageNet at 256 per step: 5005).
_C.SOLVER.ITERS_PER_EPOCH = 0
# Iterations at which "multistep" multiplies the LR by GAMMA.
_C.SOLVER.STEPS = (300000, 500000)
_C.SOLVER.GAMMA = 0.1
# Linear warm-up: iterations and starting factor.
_C.SOLVER.WARMUP_ITERS = 0
_C.SOLVER.WARMUP_FACTOR = 0.001
# Save a checkpoint every this many iterations (and at the end).
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# Keep the newest this many periodic checkpoints (model_<iteration>.pth), deleting older ones after each
# save; 0 keeps all. model_best.pth, model_final.pth and the file named in last_checkpoint are never
# deleted.
_C.SOLVER.CHECKPOINT_MAX_KEEP = 3
# Stop with an error when a loss is NaN or infinite.
_C.SOLVER.CHECK_FINITE_LOSS = True

_C.SOLVER.MAC_TARGET = CN()
# MAC-target schedule (registered in msgc.solver.SCHEDULER_REGISTRY): "linear" or "cosine".
_C.SOLVER.MAC_TARGET.NAME = "linear"
# Final target of the model's MACs as a fraction of the dense host's.
_C.SOLVER.MAC_TARGET.FINAL = 0.5
# Training progress (0..1) at which the target starts to fall from 1.0, and where it reaches FINAL.
_C.SOLVER.MAC_TARGET.PSTART = 0.0
_C.SOLVER.MAC_TARGET.PSTOP = 0.5

_C.SOLVER.GATE_NOISE = CN()
# Schedule of the scale of the gates' logistic noise in training (registered in
# msgc.solver.SCHEDULER_REGISTRY): "constant" keeps FINAL throughout (FINAL 1.0: the paper's noise);
# "linear" or "cosine" ramp it from 1.0 at progress PSTART to FINAL at PSTOP. Annealing it to 0 ends
# training with the deterministic gates of evaluation (logit >= 0), so the MAC target is met by the
# gates that evaluation uses and the BatchNorm statistics are those of the deterministic network.
_C.SOLVER.GATE_NOISE.NAME = "constant"
# The noise scale at the end (1.0: the paper; 0.0: no noise, as in evaluation).
_C.SOLVER.GATE_NOISE.FINAL = 1.0
# Training progress (0..1) at which the noise starts to fall from 1.0, and where it reaches FINAL.
_C.SOLVER.GATE_NOISE.PSTART = 0.5
_C.SOLVER.GATE_NOISE.PSTOP = 1.0

_C.SOLVER.AMP = CN()
# Mixed precision through torch.amp.
_C.SOLVER.AMP.ENABLED = False
# "bfloat16" or "float16" (float16 uses a gradient scaler).
_C.SOLVER.AMP.DTYPE = "bfloat16"

# ---------------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------------
_C.TEST = CN()
# Evaluate every this many iterations (0 = only at the end).
_C.TEST.EVAL_PERIOD = 0
# Global test batch size over all processes.
_C.TEST.IMS_PER_BATCH = 100
# After each evaluation, measure the gates on this many test images (main process) and log them to
# TensorBoard: a histogram of per-image MACs, each mask's open rate, group-wise maps (0 = off).
_C.TEST.GATE_SUMMARY_IMAGES = 256
# --eval-only at this MAC budget (a ratio of the dense MACs in (0, 1]): the gates' threshold is read
# from the budget table of MODEL.WEIGHTS' checkpoint (tools/calibrate_gates.py --budgets writes one;
# between its entries the threshold is interpolated). 0 = the model as trained (as saved).
_C.TEST.BUDGET = 0.0

# ---------------------------------------------------------------------------------------------------
# Gate calibration
# ---------------------------------------------------------------------------------------------------
# One threshold for every gate, found on held-out images so that the deterministic gates of evaluation
# spend SOLVER.MAC_TARGET.FINAL of the dense MACs on average, then folded into the generators' biases
# (msgc.evaluation.calibrate_gates; tools/calibrate_gates.py for a trained checkpoint).
_C.CALIBRATION = CN()
# Dataset of the calibration (its test split), e.g. "fashion_mnist_val": images held out from training,
# not the test set. When set, training ends with a calibration of the final model: model_calibrated.pth,
# its evaluation on DATASETS.TEST and calibration.json in OUTPUT_DIR. "" = no calibration after training.
_C.CALIBRATION.DATASET = ""
# How close to the budget the calibration set's mean MAC ratio must come.
_C.CALIBRATION.TOLERANCE = 0.002

# ---------------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------------
# Modules to import before anything is built, in every process of the run (spawned ranks and
# data-loader workers too): a project's own modules, whose decorators register its backbones,
# groupings, attention, schedulers or datasets, e.g. ["my_project.tiny"]. The working folder is
# importable. As an override: IMPORTS my_project.tiny,my_project.data. See also --import.
_C.IMPORTS = []
# Folder for checkpoints, logs, metrics.json and TensorBoard events.
_C.OUTPUT_DIR = "./output"
# Random seed; a negative value draws one from the clock (and logs it).
_C.SEED = -1
# torch.backends.cudnn.benchmark.
_C.CUDNN_BENCHMARK = False
# Console log period in iterations.
_C.LOG_PERIOD = 20

# --- engine (training loop) -------------------------------------------------------------------------
# Intra-op CPU threads of each process (torch.set_num_threads), set by default_setup; 0 keeps PyTorch's
# default (launch gives several CPU processes of one machine an equal share of its cores). Small models
# on a busy CPU often run fastest with 1.
_C.NUM_THREADS = 0
