"""The registration tutorial's example, run as written: the code block of "Registering your own backbone"
in docs/models.md is executed, built through the registry from a config, trained on the digits, and its numbers are
checked (static MACs against a count by hand, per-sample MACs, losses, deployment)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from msgc.analysis import analyze_model
from msgc.modeling import BACKBONE_REGISTRY, build_model
from test_deploy import check_same, randomize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "models.md")


def page_block(section):
    """(the first python code block after the heading ``section`` of docs/models.md, its first line number)."""
    text = open(PAGE).read()
    at = text.index(f"\n{section}\n")
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, at)
    return m.group(1), text.count("\n", 0, m.start(1)) + 1


#: A few iterations of the quickstart (the digits on the CPU) with any backbone; ``out/`` is its output.
TINY_CONFIG = f"""_BASE_: {os.path.join(ROOT, "configs", "quickstart.yaml")}
SOLVER: {{MAX_ITER: 6, WARMUP_ITERS: 1, CHECKPOINT_PERIOD: 6, IMS_PER_BATCH: 32}}
TEST: {{EVAL_PERIOD: 0, GATE_SUMMARY_IMAGES: 0}}
OUTPUT_DIR: out
"""


def write_project(folder):
    """A user's project folder: the README's module as ``my_project/tiny.py`` and ``tiny.yaml``
    (:data:`TINY_CONFIG`); returns the folder."""
    code, _ = page_block("### Registering your own backbone")
    os.makedirs(os.path.join(folder, "my_project"), exist_ok=True)
    with open(os.path.join(folder, "my_project", "tiny.py"), "w") as f:
        f.write(code)
    with open(os.path.join(folder, "tiny.yaml"), "w") as f:
        f.write(TINY_CONFIG)
    return folder


def train_net(folder, *args, tool="tools/train_net.py", timeout=240):
    """``python <msgc>/tools/train_net.py ARGS`` run from ``folder``, as a user types it there."""
    command = [sys.executable, os.path.join(ROOT, tool), *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout)


def test_train_net_imports_the_module_from_the_command_line(tmp_path):
    """``--import my_project.tiny`` from the project folder: no copy of train_net.py; it trains a few
    iterations and evaluates, and the checkpoint holds the README's network."""
    folder = write_project(tmp_path)
    proc = train_net(folder, "--import", "my_project.tiny", "--config-file", "tiny.yaml", "MODEL.BACKBONE.NAME", "tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Evaluation on digits" in proc.stdout + proc.stderr
    with open(tmp_path / "out" / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    assert [r["iteration"] for r in records if "val/top1" in r] == [5]
    losses = [r["loss_cls"] for r in records if "loss_cls" in r]
    assert losses and all(0 < x < 10 for x in losses)
    weights = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert weights["backbone.layers.1.conv2.weight"].shape == (8, 8, 3, 3)  # Block(c, 2c) at c = 16 x 0.25
    assert weights["backbone.fc.weight"].shape == (10, 8)


def test_a_saved_config_reruns_and_an_evaluation_leaves_the_training_record_as_it_was(tmp_path):
    """A run made with ``--import`` saves the module in IMPORTS, so its config.yaml reruns with no flag;
    ``--eval-only`` (failed on a truncated checkpoint, then successful) writes to ``out/eval/`` only:
    the training's config.yaml, log.txt and metrics.json stay byte for byte."""
    folder = write_project(tmp_path)
    proc = train_net(folder, "--import", "my_project.tiny", "--config-file", "tiny.yaml", "MODEL.BACKBONE.NAME", "tiny",
                     "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert "IMPORTS:\n- my_project.tiny\n" in (out / "config.yaml").read_text()
    # the model's printout goes to the log file; the console gets one line of it
    assert "Tiny(" in (out / "log.txt").read_text() and "Tiny(" not in proc.stdout + proc.stderr
    assert re.search(r"Model: Classifier, [\d.]+ M parameters, [\d.]+ M MACs per 16x16 image when dense; printed whole "
                     r"in .*log\.txt", proc.stdout)
    record = {name: (out / name).read_bytes() for name in ("config.yaml", "log.txt", "metrics.json")}

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((out / "model_final.pth").read_bytes()[:1000])
    proc = train_net(folder, "--config-file", "out/config.yaml", "--eval-only", "MODEL.WEIGHTS", str(truncated))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot read checkpoint" in errors[0] and "truncated" in errors[0], proc.stderr
    assert not (out / "eval").exists()  # nothing written before the inputs were checked

    proc = train_net(folder, "--config-file", "out/config.yaml", "--eval-only", "MODEL.WEIGHTS", "out/model_final.pth")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {name: (out / name).read_bytes() for name in record} == record
    results = json.loads((out / "eval" / "eval_results.json").read_text())
    assert results["weights"] == "out/model_final.pth" and results["results"]["num_samples"] == 360
    assert "MODEL:\n" in (out / "eval" / "config.yaml").read_text()
    assert "Evaluation on digits" in (out / "eval" / "log.txt").read_text()


def test_an_unknown_backbone_name_says_how_to_import_its_module(tmp_path):
    folder = write_project(tmp_path)
    proc = train_net(folder, "--config-file", "tiny.yaml", "MODEL.BACKBONE.NAME", "tiny")
    assert proc.returncode == 2
    assert "no backbone named 'tiny' is registered" in proc.stderr and "--import MODULE" in proc.stderr
    assert "IMPORTS" in proc.stderr


@pytest.fixture(scope="module")
def tiny():
    """The tutorial's module, executed once (its decorator registers ``tiny``)."""
    code, line = page_block("### Registering your own backbone")
    namespace = {"__name__": "my_project.tiny"}
    exec(compile("\n" * (line - 1) + code, PAGE, "exec"), namespace)  # tracebacks name docs/models.md lines
    assert BACKBONE_REGISTRY.get("tiny") is namespace["Tiny"]
    return namespace


def tiny_cfg(cfg, grouping="msgc", attention="none"):
    cfg.MODEL.BACKBONE.NAME = "tiny"
    cfg.MODEL.MSGC.GROUPING, cfg.MODEL.MSGC.ATTENTION = grouping, attention
    return cfg


def by_hand(s, c=16, heads=4, classes=10):
    """The tiny network's static costs on an s x s image as the paper counts them: (main, dgc, gen)."""
    def generator(cin, channels, h):  # 1x1 to cin // 4 (+ its BatchNorm), then 1x1 to h x channels
        return (cin + 1) * (cin // 4) + (cin // 4) * channels * h

    t = s // 2  # the second block has stride 2
    stem = 9 * 3 * c * s * s + c * s * s
    block0 = (9 * c * c + c) * s * s + (9 * c * c + c) * s * s  # conv1 + BN, conv2 + BN: gated
    block1 = (9 * c * 2 * c + 2 * c) * t * t + (9 * 2 * c * 2 * c + 2 * c) * t * t
    shortcut = c * 2 * c * t * t  # its BatchNorm uncounted, as the paper's shortcuts
    head = 2 * c * t * t + 2 * c * classes
    gen = 2 * c * s * s + generator(c, c, 1) + generator(c, c, heads) + generator(c, c, 1) + generator(c, 2 * c, heads)
    return stem + shortcut + head, block0 + block1, gen


@pytest.mark.parametrize("grouping", ["msgc", "dense"])
def test_static_macs_are_the_count_by_hand(cfg, tiny, grouping):
    costs = build_model(tiny_cfg(cfg, grouping)).backbone.complexity(16, 16)
    main, dgc, gen = by_hand(16)
    assert (costs.main, costs.dgc, costs.gen, costs.extra) == (main, dgc, gen if grouping == "msgc" else 0, 0)
    assert costs.original == main + dgc


def digits(n, seed):
    """``n`` of scikit-learn's 8x8 digits (shipped with it), upscaled to 16x16, in 3 channels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.tensor(d.images[idx.numpy()], dtype=torch.float32)[:, None] / 8.0 - 1.0
    x = torch.nn.functional.interpolate(x, size=16, mode="nearest").expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(d.target[idx.numpy()])


def test_it_trains_counts_and_deploys(cfg, tiny):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(cfg))
    assert [type(b).__name__ for b in model.backbone.blocks()] == ["Block", "Block"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train().set_mac_target(0.5)
    x, y = digits(64, seed=0)
    history = []
    for it in range(20):
        batch = slice(32 * (it % 2), 32 * (it % 2 + 1))
        losses = model(x[batch], y[batch])
        loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        assert torch.isfinite(loss) and "loss_macs" in losses, it
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((losses["loss_cls"].item(), losses["mac_ratio"].item()))
    assert history[0][1] == pytest.approx(1.0, abs=0.15)  # the gates start (nearly) open
    first, last = history[:5], history[-5:]
    assert sum(h[0] for h in last) / 5 < sum(h[0] for h in first) / 5 - 0.1  # it learns the digits
    assert sum(h[1] for h in last) / 5 < sum(h[1] for h in first) / 5 - 0.05  # and heads toward the target
    main, dgc, gen = by_hand(16)

    model.eval()
    test_x, _ = digits(16, seed=1)
    with torch.no_grad():
        macs = model(test_x)["macs"]
    # a sample costs the ungated work and the generators at least, and the dense work plus them at most
    assert ((macs >= main + gen) & (macs <= main + dgc + gen)).all()
    assert macs.mean() < main + dgc  # below the dense host, generators included
    assert len(set(macs.tolist())) > 1  # the gates decide per sample
    check_same(model, test_x)  # deployed: the eval model's logits (1e-4) and MACs (bit for bit)


def test_the_dense_grouping_is_the_host(cfg, tiny):
    """No gate: one SGD step changes the weights, no sparsity loss, every sample costs the dense MACs."""
    model = build_model(tiny_cfg(cfg, "dense")).train()
    x, y = digits(8, seed=3)
    before = model.backbone.stem[0].weight.detach().clone()
    losses = model(x, y)
    assert "loss_macs" not in losses and losses["mac_ratio"].item() == 1.0
    losses["loss_cls"].backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, model.backbone.stem[0].weight)
    main, dgc, _ = by_hand(16)
    assert model.eval()(x)["macs"].tolist() == [float(main + dgc)] * 8


def test_random_gates_and_attention_deploy(cfg, tiny):
    torch.manual_seed(0)
    model = randomize(build_model(tiny_cfg(cfg, "msgc", "channel")))
    x, _ = digits(4, seed=2)
    got = check_same(model, x)
    assert len(set(got["macs"].tolist())) > 1


def test_the_analysis_tables_see_its_blocks(cfg, tiny):
    """msgc.analysis.analyze_model (tools/analyze_model.py's tables): the blocks' row adds the gated work and
    the generators; the rest is the stem, the shortcut and the head; the measured MACs are the model's."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(cfg)).eval()
    x, _ = digits(4, seed=4)
    result = analyze_model(model, 16, [x])
    blocks, outside = result["stages"]
    main, dgc, gen = by_hand(16)
    shortcut = 16 * 32 * 8 * 8
    assert (blocks["stage"], blocks["blocks"]) == ("res2", 2)
    assert (blocks["main"], blocks["dgc"], blocks["gen"]) == (shortcut, dgc, gen)
    assert (outside["main"], outside["dgc"], outside["gen"]) == (main - shortcut, 0, 0)
    with torch.no_grad():
        assert result["measured"]["mean_macs"] == pytest.approx(model(x)["macs"].mean().item(), rel=1e-9)
    assert len(result["gated_layers"]) == 4  # two masks per block


def test_heads_that_do_not_divide_name_the_block(cfg, tiny):
    cfg.MODEL.MSGC.HEADS = 3
    with pytest.raises(ValueError, match=r"layers\.0: MODEL.MSGC.HEADS=3 does not divide its 16 output channels"):
        build_model(tiny_cfg(cfg))
