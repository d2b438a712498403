"""The trainer's and builder's GPU paths, checked on a CPU (issue 25): what would stall, fail or recompile on a
GPU, found with fakes (a CUDA generator's state, the meta device for the GPU, dynamo's compile counter)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import ferkd
from test_ferkd import fake_table

pytestmark = pytest.mark.timeout(300)


def test_selfmix_stream_resumes_on_another_device():
    """A checkpoint saved on a GPU holds a CUDA generator's 16-byte state, one saved on a CPU 5,056 bytes;
    `--device` may change on resume, so SelfMix's generator must go on (deterministically) either way."""
    cuda_state = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # seed, offset
    cpu = torch.device("cpu")
    saved = [dict(torch=torch.get_rng_state(), mix=cuda_state, cuda=torch.zeros(0, dtype=torch.uint8))]
    draws = []
    for _ in range(2):
        g = torch.Generator(cpu)
        ferkd.set_rng_states(saved, 0, g, cpu)
        draws.append(torch.rand(4, generator=g))
    assert torch.equal(*draws)
    g = torch.Generator(cpu).manual_seed(3)  # a state of this device's kind is restored exactly, as before
    state = g.get_state()
    restored = torch.Generator(cpu).manual_seed(4)
    ferkd.set_rng_states([dict(saved[0], mix=state)], 0, restored, cpu)
    assert torch.equal(restored.get_state(), state)
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=g))


class DeviceCopies(TorchFunctionMode):
    """Records each copy of a host tensor to another device: (pinned source, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.pin_memory:  # no CUDA here: pinning is marked, not done
            out = args[0].clone()
            out._pinned = True
            return out
        if func is torch.Tensor.to and args[0].device.type == "cpu":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type != "cpu":
                self.copies.append((getattr(args[0], "_pinned", False), kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("thresholds", ["rank", "p_gt"])
def test_stored_labels_reach_the_device_in_one_async_copy(thresholds):
    """The loss's labels go to the device once per step, from pinned memory and non_blocking: a copy from
    pageable memory makes the host wait for the GPU (CUDA: a stream sync before the copy), every step. The
    'device' is torch's meta device, which stands in for the GPU here."""
    N, R, k, C, n = 8, 3, 5, 10, 2
    c = ferkd.TrainConfig(kd="ferkd", labels="x", crops=n, thresholds=thresholds, t_low=0.0, t_mid=0.3,
                          t_top=1.0, mix="cutmix", mix_prob=0.5)
    loss_fn = ferkd.stored_label_loss(c, fake_table(N=N, R=R), dict(regions=R, k=k, temperature=1.0))
    meta = torch.device("meta")
    rows = N * n
    index, choice = torch.arange(N), torch.randint(0, R, (N, n))
    def step():
        return loss_fn(None, torch.zeros(rows, C, device=meta),  # x: the images (online KD's teacher's only)
                       torch.zeros(rows, dtype=torch.long, device=meta), index, choice,
                       torch.arange(rows, device=meta), torch.ones(rows, device=meta))
    with DeviceCopies() as mode:
        step()  # the first step also copies what is made once per process (beton.decode_probs's table)
        mode.copies.clear()
        loss = step()
    assert loss.device == meta
    assert mode.copies == [(True, True)]


class Batches:
    """An eval loader's stand-in: `epoch_batches` of it yields (images (B, 1, H, W, 3) uint8, labels, index)."""

    def __init__(self, sizes, classes=3, res=8):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randint(0, 256, (b, 1, res, res, 3), generator=g, dtype=torch.uint8),
                         torch.randint(0, classes, (b,), generator=g), torch.arange(b)) for b in sizes]
        self.batch_size = max(sizes)


def test_eval_compiles_one_graph_with_a_ragged_last_batch(monkeypatch):
    """A compiled model evaluated on full batches and a smaller last one: one graph (the ragged batch is padded
    to the full size), and the metrics of the uncompiled model."""
    from torch._dynamo.testing import CompileCounter
    monkeypatch.setattr(ferkd, "epoch_batches", lambda loader, epoch: iter(loader.batches))
    loader = Batches([16, 16, 5])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.0), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3))
    model(torch.zeros(2, 3, 8, 8))
    cpu = torch.device("cpu")
    want = ferkd.evaluate(model, loader, cpu, None, 3)
    torch._dynamo.reset()
    counter = CompileCounter()
    model.compile(backend=counter)
    model.train()
    model(torch.zeros(16, 3, 8, 8))  # the training graph (momentum 0: the statistics stay as evaluated)
    for _ in range(2):
        got = ferkd.evaluate(model, loader, cpu, None, 3)
    assert counter.frame_count == 2  # training + evaluation, none for the 5-image batch, none the second time
    assert got[0] == want[0] and torch.equal(got[1], want[1])
    torch._dynamo.reset()


def test_make_model_compiles_one_static_graph_per_shape(monkeypatch):
    """ferkd.make_model's compiled model: each input shape (a size of the ramp, evaluation's batch) gets its
    own static graph. By default dynamo makes a dynamic-shape graph at the second shape it sees (on a GPU the
    first evaluation compiled 3 graphs, with sympy's pow_by_natural warnings; issue 34)."""
    graphs = []

    def record(gm, example_inputs):  # the backend: is any input a symbolic size, or sized by one?
        sizes = [d for x in example_inputs for d in (x.shape if isinstance(x, torch.Tensor) else [x])]
        graphs.append(any(isinstance(d, torch.SymInt) for d in sizes))
        return gm.forward
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *args, **kw: compile_module(self, *args, backend=record, **kw))
    torch._dynamo.reset()
    c = ferkd.TrainConfig(arch="small16", compile="true")
    model = ferkd.make_model(c, 10, torch.device("cpu"), 1, None, 0.1, None)[0]
    for batch, res in [(8, 32), (8, 24), (6, 24), (8, 32)]:  # training at two sizes, a smaller batch, back
        model(torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert graphs == [False, False, False], graphs  # three shapes, three static graphs, none for the 4th
    torch._dynamo.reset()


class HostCopies(TorchFunctionMode):
    """Records the size of each tensor handed to `.cpu()` (a no-op here, a device-to-host copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


def test_label_build_copies_only_the_topk_to_the_host():
    """`labels.py build` reduces the teacher's (B, R + 1, C) probabilities to the stored top-k, p_gt and the
    whole image's top-1 before anything leaves the device."""
    import labels
    B, R, k, C = 3, 4, 5, 50
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, C))
    x, truth = torch.randn(B * (R + 1), 3, 4, 4), torch.randint(0, C, (B,))
    with HostCopies() as mode:
        top_p, top_i, gt, whole = labels.teacher_topk(model, x, truth, R, k, torch.device("cpu"), 2.0)
    assert max(mode.sizes) <= B * R * k
    p = torch.softmax(model(x) / 2.0, 1).view(B, R + 1, C)
    torch.testing.assert_close(top_p, p[:, :R].topk(k, 2).values)
    assert torch.equal(top_i, p[:, :R].topk(k, 2).indices) and torch.equal(whole, p[:, R].argmax(1))
    torch.testing.assert_close(gt, p[:, :R, :].gather(2, truth.view(B, 1, 1).expand(B, R, 1))[..., 0])


def test_epoch_rate_leaves_out_the_first_step(monkeypatch, tmp_path):
    """Epoch 1's images/s without its first step, where a compiled model compiles (here: a 3 s first step);
    the first step's seconds logged beside it. cuDNN may pick its kernels by timing (fixed shapes)."""
    import time
    make = ferkd.make_train_step

    def slow_first(*args):
        step, calls = make(*args), []

        def train_step(*batch):
            if not calls:
                time.sleep(3)
            calls.append(1)
            return step(*batch)
        return train_step
    monkeypatch.setattr(ferkd, "make_train_step", slow_first)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    ferkd.train(data="digits", kd="none", arch="small16", epochs=1, batch_size=256, device="cpu",
                tensorboard=False, run_dir=str(tmp_path))
    import json
    m = json.loads((tmp_path / "final.json").read_text())
    steps = 1437 // 256
    assert m["first_step_s"] >= 3 and m["train_seconds"] > 3
    assert m["images_per_s"] > 2 * steps * 256 / m["train_seconds"]  # a 3 s step in 5 would halve it at least
    assert torch.backends.cudnn.benchmark


def test_compiled_model_inside_ddp_splits_at_buckets(monkeypatch):
    """ferkd.make_model under DDP: the model compiled in place, then wrapped (the other order compiled
    nothing). Dynamo applies DDPOptimizer to the inner module during DDP's forward, one graph per gradient
    bucket, so each bucket's all-reduce can start while the backward of the graphs before it runs. One rank
    over gloo (make_model wraps when told of 2 processes); more buckets -> more graphs. The compiler backend
    is a counter and DDP's bucket size a parameter of the test: the rest is the project's."""
    import functools
    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounter
    compile_module, DDP = torch.nn.Module.compile, torch.nn.parallel.DistributedDataParallel
    graphs = {}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for cap_mb in (100, 1):
            torch._dynamo.reset()
            counter = CompileCounter()
            monkeypatch.setattr(torch.nn.Module, "compile",
                                lambda self, *args, **kw: compile_module(self, *args, backend=counter, **kw))
            monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                                functools.partial(DDP, bucket_cap_mb=cap_mb))
            c = ferkd.TrainConfig(arch="small64", compile="true")  # 3.6 MB of fp32 parameters
            model, ddp, *_ = ferkd.make_model(c, 10, torch.device("cpu"), 2, None, 0.1, None)
            assert isinstance(ddp, DDP) and ddp.module is model
            ddp(torch.randn(4, 3, 16, 16)).sum().backward()
            graphs[cap_mb] = counter.frame_count
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert 1 < graphs[100] < graphs[1], graphs  # DDP's first bucket is 1 MB: 2 graphs even at 100 MB
