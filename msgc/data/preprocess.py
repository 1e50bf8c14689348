"""From a loader's batch to the model's input, on the model's device: the one place that normalises.

The loaders hand ``N x 3 x H x W`` uint8 batches (a quarter of the bytes of float ones to pass between
processes, to pin and to copy to the GPU). A *preprocess* is a callable ``(images, device) -> images``
that the training step (:class:`msgc.engine.SimpleTrainer`), :func:`msgc.evaluation.inference_on_dataset`
and :func:`msgc.analysis.collect_gate_statistics` apply to every batch they read:

- :class:`Normalizer` (what :func:`build_normalizer` makes from ``INPUT.PIXEL_MEAN``/``STD``) copies a
  uint8 batch to the device (without blocking, from pinned memory, on CUDA), converts it to float in
  [0, 1] and normalises it there, with the float operations of torchvision's ``ToDtype(scale=True)``
  and ``Normalize`` in the same order, as the loader did per image before: the results are equal bit
  for bit (tested on the CPU). Its mean and std live on the device (made once per device), so a step
  copies nothing but the batch and never waits for the device. On CUDA it also makes the batch
  channels-last, the layout cuDNN's fastest convolutions read.
- :func:`to_device` only moves: the default where no preprocess is given. It refuses uint8 images,
  which the model cannot take, with an error that says what to pass.

A float batch is taken as already normalised (e.g. a registered dataset whose transform normalises,
the random images of ``tools/benchmark.py``) and is only moved: ``model(images)`` keeps taking
normalised float images. Lists of images (the detection project's batches) are handled image by image.
"""
import torch

__all__ = ["Normalizer", "build_normalizer", "to_device"]


def _move(images: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    return images.to(device, non_blocking=device.type == "cuda")


def to_device(images, device):
    """``images`` (a tensor or a list of them) on ``device``, unchanged otherwise; uint8 is an error."""
    if isinstance(images, (list, tuple)):
        return type(images)(to_device(x, device) for x in images)
    if images.dtype == torch.uint8:
        raise TypeError("the batch holds uint8 images, which the model cannot take: give a preprocess that "
                        "converts and normalises them on the device, msgc.data.build_normalizer(cfg)")
    return _move(images, device)


class Normalizer:
    """``(images, device) -> images``: uint8 images to normalised float on ``device`` (floats only moved).

    ``out = (images / 255 - mean) / std`` per channel, computed on ``device`` after the copy, in float32.

    Args:
        mean, std: per-channel mean and standard deviation in [0, 1] units (``INPUT.PIXEL_MEAN``,
            ``INPUT.PIXEL_STD``); mean 0 and std 1 only scale to [0, 1].
        channels_last: give 4-D batches the channels-last memory format (after normalising).
    """

    def __init__(self, mean, std, channels_last: bool = False):
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} and std {self.std} must have one entry per channel, std > 0")
        self.channels_last = bool(channels_last)
        self._constants = {}  # device -> (mean, std) as C x 1 x 1 float32 tensors

    def __call__(self, images, device):
        if isinstance(images, (list, tuple)):
            return type(images)(self(x, device) for x in images)
        images = _move(images, device)
        if images.dtype == torch.uint8:
            mean, std = self._on(images.device)
            images = images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
        elif not images.is_floating_point():
            raise TypeError(f"cannot normalise images of dtype {images.dtype}: expected uint8 (or float, "
                            "taken as normalised)")
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _on(self, device):
        if device not in self._constants:
            self._constants[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                                            for v in (self.mean, self.std))
        return self._constants[device]

    def __getstate__(self):  # picklable (e.g. into spawned processes) without device tensors
        return dict(self.__dict__, _constants={})

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean}, std={self.std}, channels_last={self.channels_last})"


def build_normalizer(cfg) -> Normalizer:
    """The :class:`Normalizer` of ``INPUT.PIXEL_MEAN``/``STD``, channels-last when ``MODEL.DEVICE`` is CUDA."""
    return Normalizer(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD,
                      channels_last=str(cfg.MODEL.DEVICE).startswith("cuda"))
