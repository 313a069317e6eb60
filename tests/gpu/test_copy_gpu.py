"""CUDA block copy (kvbm_cuda_copy_blocks) through the path workers' Copier: device tensors <-> pinned
host tensors for the SM kernel, the batched DMA, the per-region loop, STAGED and AUTO; region sizes
4 KiB .. 2 MiB, every layout, whole and layer by layer, poisoned destinations, untouched blocks, both
directions at once, narrow alignments, a pinned /dev/shm segment, error mapping (the native entry
points directly where the test is about them).
Skipped (tests/conftest.py) when kvbm.cuda_available() is False."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from kvbm._fast import native
from kvbm.errors import CudaError, LayoutError
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.shm import Segment, segment_name
from tests.support.copy_helpers import (
    DTYPES,
    KINDS,
    assert_copied,
    block_layout,
    copier,
    make_buffers,
    native_layout,
    random_pairs,
    split,
)

pytestmark = pytest.mark.gpu

M = native.CopyMethod
METHODS = {"auto": M.AUTO, "kernel": M.KERNEL, "dma": M.DMA, "loop": M.DMA_LOOP, "staged": M.STAGED}


def _round_trip(kind, dtype, outer_dim, region, method, layers=4, nb_dev=12, nb_host=10, n=6,
                max_sms=0, seed=0, layered=False):
    """Offload then onboard through two Copiers (the D2H and H2D workers' own streams); `layered`
    copies layer by layer as a worker does when the engine asks for layer progress."""
    gen = torch.Generator().manual_seed(seed)
    dev, dev_lay = make_buffers(kind, layers, outer_dim, nb_dev, region, dtype, device="cuda", gen=gen)
    host, host_lay = make_buffers("fc", layers, outer_dim, nb_host, region, dtype, pin=True, fill="poison")
    pairs = random_pairs(gen, n, nb_dev, nb_host)
    off = copier(dev, dev_lay, host, host_lay, cuda=True, method=METHODS[method], max_sms=max_sms)
    landed: list[int] = []
    moved = off.copy(*split(pairs), on_layer=landed.append if layered else None)
    assert moved == n * layers * outer_dim * region
    assert_copied(kind, dev, "fc", host, pairs, layers, outer_dim, nb_host)
    if layered:
        assert landed[-1] == layers - 1 and landed == sorted(set(landed)), landed

    back, back_lay = make_buffers(kind, layers, outer_dim, nb_dev, region, dtype, device="cuda",
                                  fill="poison")
    torch.cuda.synchronize()
    onboard = [(h, int(d)) for (_, h), d in zip(pairs, torch.randperm(nb_dev, generator=gen)[:n])]
    on = copier(host, host_lay, back, back_lay, cuda=True, method=METHODS[method], max_sms=max_sms)
    landed = []
    on.copy(*split(onboard), on_layer=landed.append if layered else None)
    assert_copied("fc", host, kind, back, onboard, layers, outer_dim, nb_dev)
    if layered:
        assert landed[-1] == layers - 1 and landed == sorted(set(landed)), landed


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("region", [4096, 16384, 65536, 262144])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, region, method):
    _round_trip(kind, torch.bfloat16, 2, region, method, seed=region)


@pytest.mark.parametrize("method", ["kernel", "dma", "staged", "auto"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_by_layer_round_trip(kind, method):
    _round_trip(kind, torch.bfloat16, 2, 16384, method, seed=17, layered=True)


@pytest.mark.parametrize("kind", KINDS)
def test_layered_launch_lands_each_layer_by_its_event(kind):
    """kvbm_cuda_copy_layers (the Copier's layered AUTO/KERNEL launch): once event l has fired,
    layers 0..l of every pair are in place byte for byte; the rest of the copy lands by the last."""
    L, O, region, nb = 6, 2, 16384, 24
    gen = torch.Generator().manual_seed(31)
    host, host_lay = make_buffers("fc", L, O, nb, region, torch.bfloat16, pin=True, gen=gen)
    dev, dev_lay = make_buffers(kind, L, O, nb, region, torch.bfloat16, device="cuda", fill="poison")
    pairs = random_pairs(gen, 16, nb, nb)
    on = copier(host, host_lay, dev, dev_lay, cuda=True)
    groups = on.launch_groups(*split(pairs), layers=True)
    assert [last for _, last in groups] == list(range(L))
    tensors = dev if isinstance(dev, list) else [dev]
    for event, layer in groups:
        event.synchronize()
        landed = (layer + 1) * O * region   # a block's bytes are in (layer, outer) order
        for h, d in pairs:
            assert dev_lay.block_bytes_of(tensors, d)[:landed] == host_lay.block_bytes_of([host], h)[:landed], \
                (h, d, layer)
    assert_copied("fc", host, kind, dev, pairs, L, O, nb)


def test_vouched_layouts_skip_the_per_call_check_and_pageable_ones_are_not_vouched():
    """vouch_uva (KVBM_LAYOUT_UVA_CHECKED): a Copier vouches for its device and pinned layouts
    once; a pageable one is refused the vouch and the kernel still refuses it per call."""
    L, O, region, nb = 3, 2, 4096, 4
    gen = torch.Generator().manual_seed(8)
    dev, dev_lay = make_buffers("outer", L, O, nb, region, torch.uint8, device="cuda", gen=gen)
    pinned, pin_lay = make_buffers("fc", L, O, nb, region, torch.uint8, pin=True, fill="poison")
    pageable, page_lay = make_buffers("fc", L, O, nb, region, torch.uint8, fill="poison")
    ok = copier(dev, dev_lay, pinned, pin_lay, cuda=True, method=M.KERNEL)
    assert ok.src_region.uva_checked and ok.dst_region.uva_checked
    assert all(lay.uva_checked for lay in ok.src_layers + ok.dst_layers)
    ok.copy([1, 2], [3, 0])
    assert_copied("outer", dev, "fc", pinned, [(1, 3), (2, 0)], L, O, nb)
    bad = copier(dev, dev_lay, pageable, page_lay, cuda=True, method=M.KERNEL)
    assert bad.src_region.uva_checked and not bad.dst_region.uva_checked
    with pytest.raises(LayoutError, match="pageable"):
        bad.dst_region.vouch_uva()
    with pytest.raises(LayoutError, match="pageable"):
        bad.copy([0], [0])
    copier(dev, dev_lay, pageable, page_lay, cuda=True, method=M.DMA).copy([0], [1])   # DMA takes it
    torch.cuda.synchronize()
    assert_copied("outer", dev, "fc", pageable, [(0, 1)], L, O, nb)


def test_auto_takes_the_kernel_for_small_copies_and_single_layers():
    """AUTO (csrc/cuda/copy.cu): under 16 MiB in all, the kernel; a single layer of a block (too
    small a unit for staging's DMA), the kernel; 64 whole 512 KiB blocks, staging."""
    L, O, region, nb = 16, 2, 16384, 64
    dev, dev_lay = make_buffers("outer", L, O, nb, region, torch.uint8, device="cuda", fill="poison")
    host, host_lay = make_buffers("fc", L, O, nb, region, torch.uint8, pin=True, fill="poison")
    on = copier(host, host_lay, dev, dev_lay, cuda=True)
    h = on.stream.cuda_stream
    every = list(range(nb))
    assert native.cuda_pick_method(on.src_region, on.dst_region, [3], [5], h) == M.KERNEL
    assert native.cuda_pick_method(on.src_region, on.dst_region, every, every[::-1], h) == M.STAGED
    assert native.cuda_pick_method(on.src_layers[0], on.dst_layers[0], every, every[::-1], h) == M.KERNEL


def test_layered_launch_refuses_bad_events_before_any_work():
    L, O, region, nb = 3, 2, 4096, 4
    gen = torch.Generator().manual_seed(5)
    host, host_lay = make_buffers("fc", L, O, nb, region, torch.uint8, pin=True, gen=gen)
    dev, dev_lay = make_buffers("outer", L, O, nb, region, torch.uint8, device="cuda", fill="poison")
    on = copier(host, host_lay, dev, dev_lay, cuda=True)
    events = []
    for _ in range(L):
        e = torch.cuda.Event()
        e.record(on.stream)
        events.append(e.cuda_event)
    with pytest.raises(LayoutError, match="3 layers"):
        native.copy_layers_cuda(on.src_region, on.dst_region, [0], [1], events[:2], 0, on.stream.cuda_stream)
    with pytest.raises(LayoutError, match="not created"):
        native.copy_layers_cuda(on.src_region, on.dst_region, [0], [1], events[:2] + [0], 0, on.stream.cuda_stream)
    with pytest.raises(LayoutError):
        native.copy_layers_cuda(on.src_region, on.dst_region, [nb], [1], events, 0, on.stream.cuda_stream)
    torch.cuda.synchronize()
    assert_copied("fc", host, "outer", dev, [], L, O, nb)   # nothing was written


@pytest.mark.parametrize("method", ["kernel", "dma", "auto", "staged"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_mib_regions(kind, method):
    _round_trip(kind, torch.float16, 2, 2 << 20, method, layers=2, nb_dev=5, nb_host=4, n=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outer_dim", [1, 2])
@pytest.mark.parametrize("method", ["kernel", "dma", "staged"])
def test_dtypes_outer(dtype, outer_dim, method):
    _round_trip("outer", dtype, outer_dim, 8192, method, seed=3)


@pytest.mark.parametrize("max_sms", [1, 2, 16, 1000])
def test_kernel_sm_budget(max_sms):
    _round_trip("outer", torch.bfloat16, 2, 32768, "kernel", max_sms=max_sms, n=8)
    used = native.cuda_kernel_sms(max_sms)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert used == min(max_sms, sms)
    assert native.cuda_kernel_sms(0) == min(8, sms)


@pytest.mark.parametrize("region", [4096 + 8, 4096 + 4, 4096 + 1, 16 + 2, 100])
def test_narrow_alignment(region):
    """Region sizes that forbid 16-byte vectors (8, 4, 1 byte paths, tails shorter than a chunk)."""
    for method in ("kernel", "dma", "staged"):
        _round_trip("block", torch.uint8, 2, region, method, seed=region)


def test_misaligned_base_pointer():
    """A layer base that is only 2-byte aligned forces the 1-byte kernel."""
    gen = torch.Generator().manual_seed(11)
    raw = [torch.randint(0, 256, (2 * 6 * 4096 + 2,), dtype=torch.uint8, generator=gen).cuda()
           for _ in range(2)]
    dev = [r[2:].view(2, 6, 4096) for r in raw]
    host = torch.full((4, 2, 2, 4096), 0xA5, dtype=torch.uint8).pin_memory()
    torch.cuda.synchronize()  # the Copier's stream does not wait for the current one
    copier(dev, block_layout("outer", 2, 2, 6, 4096, torch.uint8), host,
           block_layout("fc", 2, 2, 4, 4096, torch.uint8), cuda=True, method=M.KERNEL).copy([5, 1], [0, 3])
    assert_copied("outer", dev, "fc", host, [(5, 0), (1, 3)], 2, 2, 4)


def test_bidirectional_at_once():
    """Offload and onboard on their own streams at the same time, kernel one way, DMA the other."""
    gen = torch.Generator().manual_seed(5)
    L, O, region = 8, 2, 65536
    dev, dev_lay = make_buffers("outer", L, O, 64, region, torch.bfloat16, device="cuda", gen=gen)
    host_out, out_lay = make_buffers("fc", L, O, 40, region, torch.bfloat16, pin=True, fill="poison")
    host_in, in_lay = make_buffers("fc", L, O, 40, region, torch.bfloat16, pin=True, gen=gen)
    dev_in, dev_in_lay = make_buffers("outer", L, O, 64, region, torch.bfloat16, device="cuda",
                                      fill="poison")
    torch.cuda.synchronize()
    off_pairs = random_pairs(gen, 32, 64, 40)
    on_pairs = random_pairs(gen, 32, 40, 64)
    for off_method, on_method in ((M.KERNEL, M.DMA), (M.DMA, M.KERNEL), (M.STAGED, M.STAGED)):
        off = copier(dev, dev_lay, host_out, out_lay, cuda=True, method=off_method)
        on = copier(host_in, in_lay, dev_in, dev_in_lay, cuda=True, method=on_method)
        assert off.stream != on.stream
        off.launch(*split(off_pairs), layers=False)
        on.launch(*split(on_pairs), layers=True)
        torch.cuda.synchronize()
        assert_copied("outer", dev, "fc", host_out, off_pairs, L, O, 40)
        assert_copied("fc", host_in, "outer", dev_in, on_pairs, L, O, 64)


def test_copier_stream_orders_behind_engine_work():
    """The engine writes blocks on its stream and offloads without syncing the host: the copier's
    stream made to wait for that work must see it (every copy is enqueued on Copier.stream), and an
    engine stream that waits on the last event of an onboard reads the onboarded blocks."""
    L, O, region = 4, 2, 16384
    dev = [torch.zeros(O, 16, region // 2, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    host = torch.full((8, L, O, region // 2), 7.0, dtype=torch.bfloat16).pin_memory()
    config = LayoutConfig(L, O, 1, region // 2, "bfloat16")
    dev_lay = BlockLayout(config, LayoutType.LAYER_SEPARATE, 16)
    host_lay = BlockLayout(config, LayoutType.FULLY_CONTIGUOUS, 8)
    engine = torch.cuda.current_stream()
    torch.cuda.synchronize()
    for method in ("kernel", "dma", "auto", "staged"):
        off = copier(dev, dev_lay, host, host_lay, cuda=True, method=METHODS[method])
        on = copier(host, host_lay, dev, dev_lay, cuda=True, method=METHODS[method])
        assert off.cuda and off.stream is not None
        torch.cuda._sleep(20_000_000)  # keep the engine stream busy so a missing wait shows
        for t in dev:
            t[:, 3].fill_(3.0)
        off.stream.wait_stream(engine)
        off.launch(np.array([3]), np.array([5]), layers=False)[-1].synchronize()
        assert bool((host[5] == 3.0).all()), method
        engine.wait_event(on.launch(np.array([0]), np.array([9]), layers=True)[-1])
        got = torch.stack([t[:, 9] for t in dev]).float().cpu()
        assert bool((got == 7.0).all()), method
        for t in dev:
            t.zero_()
        host[5].fill_(7.0)
    torch.cuda.synchronize()


def test_ring_reuse_and_growth():
    """Many calls (ring wraps) and a call with many pairs (ring grows); block lists dropped at once."""
    gen = torch.Generator().manual_seed(9)
    dev, dev_lay = make_buffers("outer", 2, 2, 4096, 4096, torch.uint8, device="cuda", gen=gen)
    host, host_lay = make_buffers("fc", 2, 2, 4096, 4096, torch.uint8, pin=True, fill="poison")
    off = copier(dev, dev_lay, host, host_lay, cuda=True, method=M.KERNEL)
    for _ in range(300):
        s = torch.randperm(4096, generator=gen)[:64]
        off.launch(s.numpy(), s.numpy(), layers=False)
        del s
    perm = torch.randperm(4096, generator=gen)
    off.launch(perm.numpy(), torch.arange(4096).numpy(), layers=False)  # 64 KiB of block ids
    off.stream.synchronize()
    assert_copied("outer", dev, "fc", host, list(zip(perm.tolist(), range(4096))), 2, 2, 4096)


def test_ring_grows_past_its_first_size():
    """70000 pairs: 1.1 MB of block ids, more than the first 1 MiB ring."""
    nb = 70000
    gen = torch.Generator().manual_seed(10)
    dev = [torch.randint(0, 256, (1, nb, 64), dtype=torch.uint8, generator=gen).cuda()]
    host = torch.full((nb, 1, 1, 64), 0xA5, dtype=torch.uint8).pin_memory()
    perm = torch.randperm(nb, generator=gen)
    torch.cuda.synchronize()
    for method in (M.KERNEL, M.DMA):
        host.fill_(0xA5)
        copier(dev, block_layout("outer", 1, 1, nb, 64, torch.uint8), host,
               block_layout("fc", 1, 1, nb, 64, torch.uint8), cuda=True, method=method).copy(
            perm.numpy(), torch.arange(nb).numpy())
        assert torch.equal(host.view(nb, 64), dev[0][0, perm].cpu())


def test_dma_merges_contiguous_runs():
    """Fully contiguous on both sides with consecutive ids: one copy; AUTO takes DMA for it."""
    gen = torch.Generator().manual_seed(12)
    dev, dev_lay = make_buffers("fc", 4, 2, 32, 65536, torch.uint8, device="cuda", gen=gen)
    host, host_lay = make_buffers("fc", 4, 2, 32, 65536, torch.uint8, pin=True, fill="poison")
    off = copier(dev, dev_lay, host, host_lay, cuda=True)  # AUTO, as the workers run it
    assert off.method is M.AUTO
    assert native.cuda_pick_method(off.src_region, off.dst_region, list(range(8, 24)), list(range(0, 16)),
                                   off.stream.cuda_stream) == M.DMA
    off.copy(np.arange(8, 24), np.arange(0, 16))
    assert_copied("fc", dev, "fc", host, [(8 + i, i) for i in range(16)], 4, 2, 32)


def test_staged_many_chunks_and_limits():
    """More blocks than the 4 staging slots hold at once (slots rotate, several calls in a row),
    and a layout the staged path cannot take."""
    gen = torch.Generator().manual_seed(13)
    L, O, region = 4, 2, 1 << 20  # 8 MiB blocks: 4 per 32 MiB slot
    dev, dev_lay = make_buffers("outer", L, O, 48, region, torch.uint8, device="cuda", gen=gen)
    host, host_lay = make_buffers("fc", L, O, 40, region, torch.uint8, pin=True, fill="poison")
    back, back_lay = make_buffers("block", L, O, 48, region, torch.uint8, device="cuda", fill="poison")
    pairs = random_pairs(gen, 36, 48, 40)
    off = copier(dev, dev_lay, host, host_lay, cuda=True, method=M.STAGED)
    on = copier(host, host_lay, back, back_lay, cuda=True, method=M.STAGED)
    for half in (pairs[:18], pairs[18:]):
        off.launch(*split(half), layers=False)
    on.stream.wait_stream(off.stream)
    on_pairs = [(h, d) for (d, h) in pairs]
    on.launch(*split(on_pairs), layers=False)[-1].synchronize()
    assert_copied("outer", dev, "fc", host, pairs, L, O, 40)
    assert_copied("fc", host, "block", back, on_pairs, L, O, 48)
    with pytest.raises(LayoutError, match="staged copy needs"):
        copier(dev, dev_lay, back, back_lay, cuda=True, method=M.STAGED).copy([0], [0])
    assert native.cuda_pick_method(native_layout(dev, dev_lay), native_layout(back, back_lay), [0], [0]) == M.KERNEL


def test_errors_before_launch():
    dev, dev_lay = make_buffers("outer", 2, 2, 4, 4096, torch.uint8, device="cuda", fill="poison")
    host, host_lay = make_buffers("fc", 2, 2, 4, 4096, torch.uint8, pin=True, fill="poison")
    for method in METHODS.values():
        c = copier(dev, dev_lay, host, host_lay, cuda=True, method=method)
        with pytest.raises(LayoutError, match=r"destination block 4 \(pair 0\) outside \[0, 4\)"):
            c.copy([0], [4])
        with pytest.raises(LayoutError, match=r"source block -2"):
            c.copy([-2], [0], on_layer=lambda layer: None)
    with pytest.raises(LayoutError, match="copy method 7"):
        native.copy_blocks_cuda(native_layout(dev, dev_lay), native_layout(host, host_lay), [0], [0], 7)
    with pytest.raises(LayoutError, match="copy method 7"):
        copier(dev, dev_lay, host, host_lay, cuda=True, method=7)
    other, other_lay = make_buffers("fc", 3, 2, 4, 4096, torch.uint8, pin=True, fill="poison")
    with pytest.raises(LayoutError, match="layouts disagree"):
        native.copy_blocks_cuda(native_layout(dev, dev_lay), native_layout(other, other_lay), [0], [0])
    with pytest.raises(LayoutError, match="layouts disagree"):
        copier(dev, dev_lay, other, other_lay, cuda=True)
    # Pageable host memory would fault inside the kernel: refused before launch...
    pageable = torch.full((4, 2, 2, 4096), 0xA5, dtype=torch.uint8)
    with pytest.raises(LayoutError, match="pageable host memory"):
        copier(dev, dev_lay, pageable, host_lay, cuda=True, method=M.KERNEL).copy([1], [1])
    # ...but the copy engines take it.
    copier(dev, dev_lay, pageable, host_lay, cuda=True, method=M.DMA).copy([1], [1])
    assert torch.equal(pageable[1].flatten(), torch.cat([dev[l][o, 1].flatten().cpu()
                                                         for l in range(2) for o in range(2)]))
    # A CUDA failure becomes CudaError naming the call and the CUDA error; later copies still work.
    with pytest.raises(CudaError, match=r"cudaHostRegister\(.*\) failed: .* \(cuda\w+\)"):
        native.cuda_host_register(host.data_ptr(), 4096)
    copier(dev, dev_lay, host, host_lay, cuda=True, method=M.KERNEL).copy([2], [2])
    assert_copied("outer", dev, "fc", host, [(2, 2)], 2, 2, 4)


def test_copy_into_a_segment_pinned_in_place():
    """G2 as the workers hold it: a /dev/shm segment mapped, then pinned in place (Segment.pin,
    cudaHostRegister), which the SM kernel reads and writes through UVA."""
    host_lay = block_layout("fc", 2, 2, 4, 4096, torch.uint8)
    name = segment_name(f"t{uuid.uuid4().hex[:8]}", f"g2-{os.getpid()}")
    with Segment.create(name, host_lay.total_bytes) as seg:
        seg.pin()
        buf = seg.tensor()[:host_lay.total_bytes].view(4, 2, 2, 4096)
        buf.fill_(0xA5)
        dev, dev_lay = make_buffers("outer", 2, 2, 4, 4096, torch.uint8, device="cuda")
        assert buf.data_ptr() == seg.address
        copier(dev, dev_lay, buf, host_lay, cuda=True, method=M.KERNEL).copy([1, 2], [3, 0])
        assert_copied("outer", dev, "fc", buf, [(1, 3), (2, 0)], 2, 2, 4)
        del buf


def test_pageable_middle_layer_is_refused_for_the_sm_kernel():
    """Layers are separate allocations: a pageable one between pinned ones must be caught before
    the kernel would fault on it (an earlier check looked at the first and last layer only)."""
    L, O, region, nb = 3, 2, 4096, 4
    dev, dev_lay = make_buffers("fc", L, O, nb, region, torch.uint8, device="cuda")
    host = [torch.full((O, nb, region), 0xA5, dtype=torch.uint8) for _ in range(L)]
    host[0], host[2] = host[0].pin_memory(), host[2].pin_memory()   # layer 1 stays pageable
    host_lay = block_layout("outer", L, O, nb, region, torch.uint8)
    for src, src_lay, dst, dst_lay in ((dev, dev_lay, host, host_lay), (host, host_lay, dev, dev_lay)):
        for method in (M.KERNEL, M.AUTO):
            with pytest.raises(LayoutError, match="layer 1 at .* is pageable host memory"):
                copier(src, src_lay, dst, dst_lay, cuda=True, method=method).copy([1], [2])
    # The copy engines take pageable memory: DMA still copies every layer.
    copier(dev, dev_lay, host, host_lay, cuda=True, method=M.DMA).copy([1], [2])
    assert_copied("fc", dev, "outer", host, [(1, 2)], L, O, nb)


def test_overflowing_layouts_are_refused_before_any_cuda_work():
    """The CUDA entry point runs the same layout checks as the CPU one (tests/unit/test_copy.py)."""
    one = torch.full((4, 1, 2, 4096), 0xA5, dtype=torch.uint8, device="cuda")
    one_lay = native_layout(one, block_layout("fc", 1, 2, 4, 4096, torch.uint8))
    huge = native.RegionLayout([one.data_ptr()], 2, 2**40, 2**30, 4096, 4096)   # 2^70 bytes of blocks
    wraps = native.RegionLayout([2**64 - 4096], 2, 4, 8192, 4096, 4096)          # base + span wraps
    for method in METHODS.values():
        with pytest.raises(LayoutError, match="overflow a 64-bit offset"):
            native.copy_blocks_cuda(huge, one_lay, [0], [0], method)
        with pytest.raises(LayoutError, match="wraps"):
            native.copy_blocks_cuda(one_lay, wraps, [0], [0], method)
    torch.cuda.synchronize()
    assert bool((one == 0xA5).all())


STAGER_OOM = r"""
import torch
from kvbm._fast import native
from kvbm.errors import CudaError
from tests.support.copy_helpers import assert_copied, copier, make_buffers
L, O, region, nb = 2, 2, 65536, 8
gen = torch.Generator().manual_seed(21)
dev, dev_lay = make_buffers("outer", L, O, nb, region, torch.uint8, device="cuda", gen=gen)
host, host_lay = make_buffers("fc", L, O, nb, region, torch.uint8, pin=True, fill="poison")
off = copier(dev, dev_lay, host, host_lay, cuda=True, method=native.CopyMethod.STAGED)
# Leave less free device memory than the stager's 4 slots need, so its cudaMalloc fails.
hog, step = [], 1 << 30
while step >= (2 << 20):
    try:
        if torch.cuda.mem_get_info()[0] < (48 << 20):
            break
        hog.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        step //= 2
print("free while hogged:", torch.cuda.mem_get_info()[0] >> 20, "MiB", flush=True)
try:
    off.copy([1, 5], [0, 3])
except CudaError as err:
    print("first call:", err, flush=True)
else:
    raise SystemExit("staged copy succeeded with no device memory for its slots")
del hog
torch.cuda.empty_cache()
for _ in range(2):   # a later call builds the stager afresh and copies
    off.copy([1, 5], [0, 3])
assert_copied("outer", dev, "fc", host, [(1, 0), (5, 3)], L, O, nb)
print("ok")
"""


def test_stager_that_failed_to_build_is_rebuilt_by_a_later_call():
    """A stager whose slots could not be allocated is torn down; the next call starts over.
    In a child process: the stager is per process, and this one's is built by earlier tests."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])   # for tests.support
    res = subprocess.run([sys.executable, "-c", STAGER_OOM], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), res.stdout + res.stderr


def test_staged_call_of_one_slot_is_split_into_chunks():
    """40 blocks of 512 KiB fit one 32 MiB slot; the call is cut into 4 chunks of 10 blocks (so its
    gathers overlap its DMA): every block still lands, both directions, slots rotating across calls."""
    gen = torch.Generator().manual_seed(14)
    L, O, region = 4, 2, 65536
    dev, dev_lay = make_buffers("outer", L, O, 96, region, torch.uint8, device="cuda", gen=gen)
    host, host_lay = make_buffers("fc", L, O, 80, region, torch.uint8, pin=True, fill="poison")
    back, back_lay = make_buffers("outer", L, O, 96, region, torch.uint8, device="cuda", fill="poison")
    pairs = random_pairs(gen, 80, 96, 80)
    off = copier(dev, dev_lay, host, host_lay, cuda=True, method=M.STAGED)
    on = copier(host, host_lay, back, back_lay, cuda=True, method=M.STAGED)
    for half in (pairs[:40], pairs[40:]):
        off.launch(*split(half), layers=False)
    on.stream.wait_stream(off.stream)
    on_pairs = [(h, d) for (d, h) in pairs]
    for half in (on_pairs[:40], on_pairs[40:]):
        events = on.launch(*split(half), layers=False)
    events[-1].synchronize()
    assert_copied("outer", dev, "fc", host, pairs, L, O, 80)
    assert_copied("fc", host, "outer", back, on_pairs, L, O, 96)
