"""Training speed of the course's U-Net on this machine: the fp32 matrix-product peak, throughput against diffusers' UNet2DModel at
matched parameters and FLOPs, and the effect of bf16 autocast, channels-last, torch.compile, the batch size and the attention kernel.

    python bench/train_speed.py [--quick] [--json results.json]

Each comparison is timed in alternation (A, B, A, B, ...; the best of each) in one process; peak memory is measured for each row in a
fresh process (`--rss SPEC`). Run it with the machine otherwise idle and torch's default threads (both cores, as a user trains)."""
import argparse, json, math, os, subprocess, sys, time
import torch
from diffstudy.nets.unet import UNet, UNetConfig
from diffstudy.diffusion import diffusion_loss
from diffstudy.schedules import get_schedule

SCHED = get_schedule('cosine')

# the course's U-Nets: the shipped pixel configuration, two larger pixel ones, and a latent one of the size the second half uses
OURS = {
    'pixel 0.6': dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,)),
    'pixel 1.9': dict(model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,), head_channels=48),
    'pixel 3.7': dict(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8)),
    'latent 2.0': dict(image_size=16, in_channels=4, out_channels=4, model_channels=96, channel_mult=(1, 2, 2), num_res_blocks=2,
                       attention_resolutions=(8, 4), head_channels=48),
}
# diffusers' UNet2DModel with the same levels, attention and blocks, its width chosen to match parameters and FLOPs (a search over widths)
DIFFUSERS = {'pixel 0.6': dict(ch=36, layers=1, mult=(1, 2, 2), attn=(2,)),
             'pixel 1.9': dict(ch=52, layers=2, mult=(1, 2, 2), attn=(2,)),
             'pixel 3.7': dict(ch=72, layers=2, mult=(1, 2, 2, 2), attn=(1, 2))}

def matmul_peak(n=2048, dtype=torch.float32, reps=10):
    "The best FLOP/s of an n x n matrix product."
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2): a @ b
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best

class DiffusersNet(torch.nn.Module):
    "diffusers' UNet2DModel called as the course calls a network: net(x, t) -> a tensor shaped like x."
    def __init__(self, ch, layers, mult, attn, size=32, channels=1):
        super().__init__()
        from diffusers import UNet2DModel
        down = tuple('AttnDownBlock2D' if i in attn else 'DownBlock2D' for i in range(len(mult)))
        up = tuple(reversed(['AttnUpBlock2D' if i in attn else 'UpBlock2D' for i in range(len(mult))]))
        self.m = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=layers,
                             block_out_channels=tuple(ch * m for m in mult), down_block_types=down, up_block_types=up,
                             attention_head_dim=32, norm_num_groups=math.gcd(32, ch))
    def forward(self, x, t): return self.m(x, t).sample

def build(spec: dict):
    "A network and its input shape from a spec {'kind': 'ours' | 'diffusers', 'name': ...}."
    torch.manual_seed(0)
    if spec['kind'] == 'ours':
        cfg = UNetConfig(**OURS[spec['name']])
        return UNet(cfg), (cfg.in_channels, cfg.image_size, cfg.image_size)
    return DiffusersNet(**DIFFUSERS[spec['name']]), (1, 32, 32)

class Stepper:
    "One training step as the loop takes it (v-prediction loss, backward, AdamW) with the loop's options."
    def __init__(self, spec: dict):
        self.spec = spec
        self.net, shape = build(spec)
        b = spec.get('batch', 64)
        self.x, self.t = torch.randn(b, *shape), torch.randint(0, 1000, (b,))
        if spec.get('channels_last'):
            self.net = self.net.to(memory_format=torch.channels_last); self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.flops = self._count()
        self.f = torch.compile(self.net) if spec.get('compile') else self.net
        t0 = time.perf_counter(); self(); self(); self.first_s = time.perf_counter() - t0  # includes compilation

    def _count(self) -> int:
        "Training FLOPs of the batch, forward and backward, counted by torch.utils.flop_counter."
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc: diffusion_loss(self.net, self.x, SCHED, 'v', t=self.t).backward()
        self.net.zero_grad(set_to_none=True)
        return fc.get_total_flops()

    def __call__(self):
        from torch.nn.attention import sdpa_kernel, SDPBackend
        kernel = {'math': SDPBackend.MATH, 'flash': SDPBackend.FLASH_ATTENTION}.get(self.spec.get('attention'))
        with sdpa_kernel(kernel) if kernel else torch.autocast('cpu', enabled=False), \
             torch.autocast('cpu', torch.bfloat16, enabled=bool(self.spec.get('bf16'))):
            loss = diffusion_loss(self.f, self.x, SCHED, 'v', t=self.t)
        loss.backward(); self.opt.step(); self.opt.zero_grad(set_to_none=True)

def paired(a: Stepper, b: Stepper, reps: int = 4, steps: int = 2):
    "Best seconds per step of two steppers, timed in alternation."
    ta, tb = [], []
    for _ in range(reps):
        for s, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            for _ in range(steps): s()
            out.append((time.perf_counter() - t0) / steps)
    return min(ta), min(tb)

def rss_mb(spec: dict) -> float:
    """Peak resident memory (MB) of a fresh process that builds the spec's network and takes 3 training steps, minus the process's memory
    before (without torch.compile, whose compiler's own memory is not the training step's)."""
    spec = {k: v for k, v in spec.items() if k != 'compile'}
    r = subprocess.run([sys.executable, __file__, '--rss', json.dumps(spec)], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    if r.returncode: raise RuntimeError(r.stderr[-2000:])
    return float(r.stdout.strip().splitlines()[-1])

def _vm(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024

def _rss_child(spec):
    base = _vm('VmRSS:')
    s = Stepper(spec)
    s()
    print(_vm('VmHWM:') - base)

def row(spec: dict, sec: float, peak: float, s: Stepper) -> dict:
    n = len(s.x)
    return dict(spec=spec, img_s=n / sec, gflops=s.flops / sec / 1e9, of_peak=s.flops / sec / peak, gflop_fwd=s.flops / n / 3 / 1e9,
                params_m=sum(p.numel() for p in s.net.parameters()) / 1e6, first_s=s.first_s, s_step=sec)

def compare(a: dict, b: dict, peak: float, reps: int) -> tuple:
    sa, sb = Stepper(a), Stepper(b)
    ta, tb = paired(sa, sb, reps)
    ra, rb = row(a, ta, peak, sa), row(b, tb, peak, sb)
    del sa, sb
    return ra, rb

def label(spec):
    opts = [k if v is True else f'{k} {v}' for k, v in spec.items() if k not in ('kind', 'name') and v not in (None, False)]
    return f"{spec['kind']} {spec['name']}" + (f" ({', '.join(opts)})" if opts else '')

def run(quick: bool = False, out=None):
    reps = 2 if quick else 4
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})", flush=True)
    peak = matmul_peak()
    print(f"fp32 matrix-product peak {peak / 1e9:.0f} GFLOP/s; bf16 {matmul_peak(dtype=torch.bfloat16) / 1e9:.0f} GFLOP/s\n", flush=True)
    results = dict(peak_gflops=peak / 1e9, threads=torch.get_num_threads(), rows=[], pairs=[])
    head = f"{'network':<44}{'params':>8}{'GFLOP':>7}{'img/s':>8}{'GFLOP/s':>9}{'of peak':>9}{'RSS MB':>8}"
    def show(r):
        print(f"{label(r['spec']):<44}{r['params_m']:>7.2f}M{r['gflop_fwd']:>7.3f}{r['img_s']:>8.1f}{r['gflops']:>9.0f}{r['of_peak']:>9.0%}"
              f"{r['rss_mb']:>8.0f}", flush=True)
    def pair(a, b, what):
        ra, rb = compare(a, b, peak, reps)
        for r in (ra, rb): r['rss_mb'] = rss_mb(r['spec']); results['rows'].append(r)
        ratio = rb['gflops'] / ra['gflops']
        results['pairs'].append(dict(what=what, a=label(a), b=label(b), ratio=ratio, first_s=(ra['first_s'], rb['first_s'])))
        show(ra); show(rb)
        print(f"{'':<4}{what}: {ratio:.2f}" + (f"   (first two steps: {ra['first_s']:.1f} s and {rb['first_s']:.1f} s)" if 'compile' in what else ''), flush=True)
        return ratio
    print("1. ours against diffusers' UNet2DModel at matched parameters and FLOPs (fp32, batch 64); the ratio is GFLOP/s, diffusers / ours\n" + head)
    for name in DIFFUSERS: pair(dict(kind='ours', name=name), dict(kind='diffusers', name=name), 'diffusers / ours')
    print("\n2. the loop's options on the shipped pixel and the latent U-Net (batch 64); the ratio is with / without\n" + head)
    for name in ('pixel 0.6', 'latent 2.0'):
        base = dict(kind='ours', name=name)
        for opt in (dict(bf16=True), dict(channels_last=True), dict(bf16=True, channels_last=True), dict(compile=True),
                    dict(bf16=True, compile=True), dict(attention='math'), dict(attention='flash')):
            what = ' + '.join(k if v is True else f'{k} {v}' for k, v in opt.items()) + ' / plain'
            try: pair(base, {**base, **opt}, what)
            except RuntimeError as e: print(f"    {what}: not available ({str(e).splitlines()[0][:80]})")
    print("\n3. batch size, shipped pixel U-Net, fp32 and bf16; the ratio is against batch 64\n" + head)
    for bf16 in (False, True):
        for b in (32, 128, 256):
            pair(dict(kind='ours', name='pixel 0.6', batch=64, bf16=bf16), dict(kind='ours', name='pixel 0.6', batch=b, bf16=bf16), f'batch {b} / 64')
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        json.dump(results, open(out, 'w'), indent=1)
    return results

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='fewer repetitions')
    ap.add_argument('--json', help='write the results here')
    ap.add_argument('--rss', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss: _rss_child(json.loads(a.rss))
    else: run(a.quick, a.json)
