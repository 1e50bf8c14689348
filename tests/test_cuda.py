"""What runs on a GPU alone: AMP float16 with loss scaling and the scaler's resume, channels-last,
pinned-memory loaders with non-blocking copies, nvjpeg decoding, an NCCL group of one process, eval and
``deploy(native=False)`` on CUDA against the CPU and the eval model.

Skipped where ``torch.cuda.is_available()`` is False (CI); on a machine with a GPU they run with or
without ``pytest --device cuda`` (which moves the suite's device-independent tests there too).
``tools/gpu_selftest.py`` runs this file first. Float32 comparisons run without TF32.
"""
import json

import pytest
import torch
from PIL import Image

from conftest import NO_CUDA, narrow
from msgc.config import get_cfg
from msgc.data import build_normalizer, build_test_loader, build_train_loader, read_image
from msgc.deploy import deploy
from msgc.engine import DefaultTrainer, create_ddp_model
from msgc.engine.launch import find_free_port
from msgc.evaluation import ClassificationEvaluator, inference_on_dataset
from msgc.modeling import build_model
from msgc.utils import comm
from test_deploy import images, randomize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact float32 on the GPU (TF32 rounds convolutions to about 1e-3), restored afterwards."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def small_cfg(tmp_path=None, name="msgc_resnet18", attention="channel", **overrides):
    """A narrow model on synthetic 32x32 images, on CUDA."""
    cfg = narrow(get_cfg(), name, attention=attention)
    cfg.MODEL.DEVICE = "cuda"
    cfg.MODEL.NUM_CLASSES = 10
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = "synthetic", ""
    cfg.DATASETS.SYNTHETIC_LENGTH = cfg.DATASETS.SYNTHETIC_TEST_LENGTH = 32
    cfg.INPUT.TRAIN_SIZE = cfg.INPUT.TEST_SIZE = cfg.INPUT.TEST_RESIZE = 32
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH, cfg.TEST.IMS_PER_BATCH = 8, 8
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = 6, 0, 3
    cfg.SOLVER.MAC_TARGET.FINAL = 0.5
    cfg.SEED = 1
    cfg.OUTPUT_DIR = str(tmp_path) if tmp_path is not None else ""
    cfg.merge_from_list([str(x) for kv in overrides.items() for x in kv])
    return cfg


def randomized(cfg):
    """The model of ``cfg`` with test_deploy's random BatchNorm statistics and gates (drawn on the CPU), on
    the CPU."""
    cpu = cfg.clone()
    cpu.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    return randomize(build_model(cpu))


def _fresh_scaler_state():
    return torch.amp.GradScaler("cuda").state_dict()


def test_amp_float16_scales_the_loss_and_resume_restores_the_scaler(tmp_path):
    cfg = small_cfg(tmp_path, **{"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.DTYPE": "float16"})
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    state = trainer.state_dict()["grad_scaler"]
    assert state["scale"] > 0 and state != _fresh_scaler_state()  # it counted steps (or backed off)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)["trainer"]["grad_scaler"]
    assert saved == state

    more = cfg.clone()
    more.SOLVER.MAX_ITER = 8
    resumed = DefaultTrainer(more)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6 and resumed.state_dict()["grad_scaler"] == state
    resumed.train()
    after = resumed.state_dict()["grad_scaler"]
    # two more steps: the growth tracker moved on by two, or an overflow halved the scale and reset it
    assert after["_growth_tracker"] == state["_growth_tracker"] + 2 or after["scale"] < state["scale"]


def test_amp_bfloat16_training_step_on_channels_last_input():
    model = build_model(small_cfg(name="msgc_resnet50")).train()
    x = torch.randn(4, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3], device=CUDA)
    model.set_mac_target(0.3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(x, labels)
    loss = losses["loss_cls"] + losses["loss_macs"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_channels_last_batches_give_the_contiguous_outputs():
    cfg = small_cfg()
    normalize = build_normalizer(cfg)
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = normalize(batch, CUDA)
    assert x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last)
    model = randomized(cfg).to(CUDA)
    with torch.no_grad():
        cl, plain = model(x), model(x.contiguous())
    torch.testing.assert_close(cl["logits"], plain["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(cl["macs"], plain["macs"])


def test_pinned_memory_loader_and_non_blocking_copies():
    cfg = small_cfg(**{"DATALOADER.NUM_WORKERS": 1})
    loader = build_train_loader(cfg, rank=0, world_size=1)
    assert loader.pin_memory
    images_, labels = next(iter(loader))
    assert images_.is_pinned() and images_.dtype == torch.uint8 and images_.shape == (8, 3, 32, 32)
    x = build_normalizer(cfg)(images_, CUDA)  # a non-blocking copy from pinned memory
    torch.cuda.synchronize()
    want = (images_.float() / 255 - torch.tensor(cfg.INPUT.PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(
        cfg.INPUT.PIXEL_STD).view(3, 1, 1)
    torch.testing.assert_close(x.cpu(), want, rtol=1e-5, atol=1e-5)


def _jpeg_tree(root, n=6):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(3, 48, 40, generator=g) * 255).to(torch.uint8)
        pixels = torch.nn.functional.avg_pool2d(pixels[None].float(), 5, 1, 2)[0].to(torch.uint8)  # photo-like
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=90)
    return root


def test_gpu_decoding(tmp_path):
    root = _jpeg_tree(tmp_path)
    path = str(next((root / "train" / "a").iterdir()))
    cpu, gpu = read_image(path), read_image(path, device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8 and gpu.shape == cpu.shape == (3, 48, 40)
    # nvjpeg and libjpeg-turbo round their IDCT and chroma upsampling differently
    assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 2.0
    cfg = small_cfg(**{"DATASETS.TRAIN": "imagefolder", "DATASETS.ROOT": str(root), "INPUT.DECODE_DEVICE": "cuda",
                       "SOLVER.IMS_PER_BATCH": 4, "MODEL.NUM_CLASSES": 2})
    loader = build_train_loader(cfg, rank=0, world_size=1)
    assert not loader.pin_memory  # the batches are on the GPU already
    batch, labels = next(iter(loader))
    assert batch.device.type == "cuda" and batch.dtype == torch.uint8 and batch.shape == (4, 3, 32, 32)
    assert set(labels.tolist()) <= {0, 1}


def test_nccl_group_of_one_process():
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0,
                                         world_size=1)
    try:
        assert torch.distributed.get_backend() == "nccl"
        assert comm.get_world_size() == 1 and comm.all_gather({"rank": comm.get_rank()}) == [{"rank": 0}]
        total = torch.full((3,), 2.0, device=CUDA)
        torch.distributed.all_reduce(total)  # an NCCL collective, whatever comm skips at world size 1
        assert total.tolist() == [2.0, 2.0, 2.0]
        comm.synchronize()
        model = build_model(small_cfg()).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        losses = ddp(torch.randn(2, 3, 32, 32, device=CUDA), torch.tensor([0, 1], device=CUDA))
        (losses["loss_cls"] + losses["loss_macs"]).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert create_ddp_model(model) is model  # world size 1: no wrapping
    finally:
        torch.distributed.destroy_process_group()


def test_eval_on_cuda_equals_eval_on_cpu():
    cfg = small_cfg(**{"DATASETS.TEST": "synthetic"})
    cpu_cfg = cfg.clone()
    cpu_cfg.MODEL.DEVICE = "cpu"
    model = randomized(cpu_cfg)
    x = images(8)
    with torch.no_grad():
        want = model(x)
        model.to(CUDA)
        got = model(x.to(CUDA))
    same = got["macs"].cpu() == want["macs"]
    assert same.float().mean() >= 0.75, "a gate decision may flip within rounding, not most of them"
    torch.testing.assert_close(got["logits"].cpu()[same], want["logits"][same], rtol=1e-4, atol=1e-4)
    results = {}
    for device, c in (("cuda", cfg), ("cpu", cpu_cfg)):
        model.to(device)
        results[device] = inference_on_dataset(model, build_test_loader(c), ClassificationEvaluator(model.dense_macs),
                                               preprocess=build_normalizer(c))
    assert results["cuda"]["num_samples"] == results["cpu"]["num_samples"] == 32
    assert abs(results["cuda"]["top1"] - results["cpu"]["top1"]) <= 100 / 32 + 1e-9  # one image at most
    assert results["cuda"]["mac_ratio"] == pytest.approx(results["cpu"]["mac_ratio"], abs=0.02)
    json.dumps(results)  # plain numbers, as train_net writes them


@pytest.mark.parametrize("name", ["msgc_resnet18", "msgc_resnet50", "msgc_mobilenetv2"])
def test_deploy_on_cuda_equals_the_eval_model(name):
    model = randomized(small_cfg(name=name)).to(CUDA)
    x = images(6).to(CUDA)
    with torch.no_grad():
        want = model(x)
    deployed = deploy(model, native=False)
    assert not deploy(model).native  # on a GPU the default is PyTorch's kernels
    got = deployed(x)
    assert got["logits"].device.type == "cuda"
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-4)
    assert torch.equal(got["macs"], want["macs"])
