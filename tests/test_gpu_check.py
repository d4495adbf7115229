"""`make gpu-check-cpu`: the GPU check's five checks at toy size on CPU, one JSON, its path last.

On CPU the torchrun check runs gloo; it still proves what the GPU run needs: one torchrun
process joins its process group (mmseg then trains under DDP, as InternVL's single-GPU runs do).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_writes_every_number(tmp_path):
    out = tmp_path / 'gpu_check.json'
    run = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--device', 'cpu',
                          '--ks', '1', '2', '--iters', '10', '--out', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(out)
    r = json.loads(out.read_text())
    assert r['failed'] == []

    a = r['torchrun_train']
    assert a['backend'] == 'gloo'  # one torchrun process is distributed (was: no process group)
    assert a['loss_finite'] and a['losses']
    assert 0.0 < a['mIoU'] <= 1.0
    assert a['sync_batchnorm_layers'] == 0  # CPU: reverted to BatchNorm2d (kept on GPU)

    b = r['backbone_forward']  # timings: what the run measured, consistent with each other
    assert math.isclose(b['tflops'], b['tflop_per_image'] * 1e3 / b['ms_per_image'], rel_tol=1e-6)
    assert math.isclose(b['pct_of_peak'], 100 * b['tflops'] / b['matmul_peak_tflops'],
                        rel_tol=1e-6)

    rows = r['trial_group']['rows']
    assert [row['k'] for row in rows] == [1, 2]
    assert rows[0]['ideal'] == 1.0 and rows[1]['ideal'] > 1.0
    for row in rows:
        assert math.isclose(row['loop_speedup'], row['loop_solo_ms'] / row['loop_group_ms'],
                            rel_tol=1e-6)
    assert [row['first'] for row in rows] == ['solo', 'grouped']  # alternating
    assert r['trial_group']['warmup'] and 'computed' in r['checkpoint_size']['how']

    d = r['finetune_step']
    assert d['backend'] == 'gloo' and d['world_size'] == 1
    # every backbone tensor got a gradient (CPU mode: no drop path) and the step moved each
    # (a weight's share of unmoved elements varies with the data: measured 0.9968-1.0 with
    # drop path, so the elements' fraction is reported, not asserted)
    assert d['loss_finite'] and d['backbone_dtype'] == 'torch.float32'
    assert d['backbone_tensors_with_grad'] == d['backbone_tensors']
    assert d['backbone_tensors_unmoved_with_grad'] == []

    e = r['checkpoint_size']
    assert e['vit6b_backbone_params_b'] > 5.8
    assert e['vit6b_linear_probe_gb_with_backbone'] > 11 > e['vit6b_linear_probe_mb_without'] / 1e3
    assert e['backbone_tensors_in_it'] == 0 and 'trial_group_solo_checkpoint_bytes' in e


def test_a_check_past_the_deadline_is_reported_not_started(tmp_path):
    """`--until` keeps `make gpu-sweep` within the GPU machine's command limit: a check with
    under 10 s left is not started, says so in the JSON, and the run exits non-zero."""
    import time
    out = tmp_path / 'gpu_check.json'
    run = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--device', 'cpu',
                          '--only', 'e', '--until', str(time.time() + 5), '--out', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r['failed'] == ['checkpoint_size']
    assert r['checkpoint_size']['error'].startswith('not started: ')
