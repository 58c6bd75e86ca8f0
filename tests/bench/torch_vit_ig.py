# Copied from the project's shared anchors (shared/anchors/torch_vit_ig.py): a PyTorch reference harness, not project code.
"""PyTorch reference for one Inverting-Gradients attack step on a ViT, for side-by-side timing.

Same architecture as fedleak's default tiny ViT ("small": 32x32x3, patch 4, dim 192, depth 4, heads 3,
MLP 768, 10 classes, learnable CLS token and position embedding, pre-norm LayerNorm eps 1e-6, GELU) and
ViT-B/16 at 224 ("vitb"). Parameter names follow timm, not Hugging Face.

  python torch_vit_ig.py bench BATCH ITERS [small|vitb] [WARMUP]
      prints attack_iter_median_ms (forward, parameter gradients with create_graph=True, 1 - cosine +
      TV 1e-4, backward to the input) and fwd_bwd1_median_ms (one first-order forward+backward).
  python torch_vit_ig.py check FILE.safetensors
      recomputes, in f64, the gradients stored in FILE (keys param.*, target.*, labels, x_true,
      x_prime, grad_x_prime, ig_loss) and prints the relative error against them.

Needs: pip install torch safetensors (a large download). Runs on 2 threads (torch.set_num_threads(2)).
"""
import sys, time, math, statistics
import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def cfg(name):
    if name == "vitb":
        return dict(img=224, patch=16, dim=768, depth=12, heads=12, mlp=3072, classes=1000)
    return dict(img=32, patch=4, dim=192, depth=4, heads=3, mlp=768, classes=10)


def init_params(c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, p = c["dim"], c["patch"]
    n = (c["img"] // p) ** 2

    def u(shape, fan):
        b = 1 / math.sqrt(fan)
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * b

    P = {}
    P["patch_embed.proj.weight"] = u((d, 3, p, p), 3 * p * p)
    P["patch_embed.proj.bias"] = u((d,), 3 * p * p)
    P["cls_token"] = torch.randn((1, 1, d), generator=g, dtype=torch.float64) * 0.02
    P["pos_embed"] = torch.randn((1, n + 1, d), generator=g, dtype=torch.float64) * 0.02
    for l in range(c["depth"]):
        pre = f"blocks.{l}."
        for nm in ["norm1", "norm2"]:
            P[pre + nm + ".weight"] = torch.ones(d, dtype=torch.float64)
            P[pre + nm + ".bias"] = torch.zeros(d, dtype=torch.float64)
        P[pre + "attn.qkv.weight"] = u((3 * d, d), d)
        P[pre + "attn.qkv.bias"] = u((3 * d,), d)
        P[pre + "attn.proj.weight"] = u((d, d), d)
        P[pre + "attn.proj.bias"] = u((d,), d)
        P[pre + "mlp.fc1.weight"] = u((c["mlp"], d), d)
        P[pre + "mlp.fc1.bias"] = u((c["mlp"],), d)
        P[pre + "mlp.fc2.weight"] = u((d, c["mlp"]), c["mlp"])
        P[pre + "mlp.fc2.bias"] = u((d,), c["mlp"])
    P["norm.weight"] = torch.ones(d, dtype=torch.float64)
    P["norm.bias"] = torch.zeros(d, dtype=torch.float64)
    P["head.weight"] = u((c["classes"], d), d)
    P["head.bias"] = u((c["classes"],), d)
    return {k: v.to(dtype).requires_grad_(True) for k, v in sorted(P.items())}


def forward(P, x, c):
    B = x.shape[0]
    d, h = c["dim"], c["heads"]
    hd = d // h
    t = F.conv2d(x, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=c["patch"])
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([P["cls_token"].expand(B, 1, d), t], 1) + P["pos_embed"]
    N = t.shape[1]
    for l in range(c["depth"]):
        pre = f"blocks.{l}."
        y = F.layer_norm(t, (d,), P[pre + "norm1.weight"], P[pre + "norm1.bias"], 1e-6)
        qkv = F.linear(y, P[pre + "attn.qkv.weight"], P[pre + "attn.qkv.bias"])
        qkv = qkv.reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (hd ** -0.5)
        a = a.softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(B, N, d)
        t = t + F.linear(o, P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), P[pre + "norm2.weight"], P[pre + "norm2.bias"], 1e-6)
        y = F.gelu(F.linear(y, P[pre + "mlp.fc1.weight"], P[pre + "mlp.fc1.bias"]))
        t = t + F.linear(y, P[pre + "mlp.fc2.weight"], P[pre + "mlp.fc2.bias"])
    t = F.layer_norm(t, (d,), P["norm.weight"], P["norm.bias"], 1e-6)
    return F.linear(t[:, 0], P["head.weight"], P["head.bias"])


def tv(x):
    return (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean() + (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()


def ig_loss(P, x, y, target, c, tv_w):
    names = list(P.keys())
    loss = F.cross_entropy(forward(P, x, c), y)
    g = torch.autograd.grad(loss, [P[n] for n in names], create_graph=True)
    dot = sum((gi * ti).sum() for gi, ti in zip(g, target))
    gn = sum(gi.pow(2).sum() for gi in g)
    tn = sum(ti.pow(2).sum() for ti in target)
    l = 1 - dot / (gn.sqrt() * tn.sqrt())
    return l + tv_w * tv(x) if tv_w > 0 else l


def check(path):
    from safetensors.torch import load_file
    m = load_file(path)
    c = cfg("small")
    P = {k[len("param."):]: v.clone().requires_grad_(True) for k, v in m.items() if k.startswith("param.")}
    P = dict(sorted(P.items()))
    target = [m["target." + k] for k in P]
    y = m["labels"]
    # 1st-order target grads recomputed in torch
    x_true = m["x_true"]
    loss = F.cross_entropy(forward(P, x_true, c), y)
    g = torch.autograd.grad(loss, list(P.values()))
    rel1 = max(((a - b).norm() / b.norm()).item() for a, b in zip(g, target))
    x = m["x_prime"].clone().requires_grad_(True)
    l = ig_loss(P, x, y, target, c, 1e-2)
    (gx,) = torch.autograd.grad(l, [x])
    gc = m["grad_x_prime"]
    print(f"torch f64: max rel L2 err of 1st-order param grads (candle vs torch) = {rel1:.2e}")
    print(f"IG loss torch={l.item():.12f} candle={m['ig_loss'].item():.12f}")
    print(f"dIG/dx': rel L2 err candle vs torch = {((gx - gc).norm() / gx.norm()).item():.3e}, "
          f"max abs diff = {(gx - gc).abs().max().item():.3e}, max |g| = {gx.abs().max().item():.3e}")


def bench(b, iters, model, warmup=3):
    c = cfg(model)
    P = init_params(c, torch.float32)
    names = list(P.keys())
    gen = torch.Generator().manual_seed(1)
    x_true = torch.rand(b, 3, c["img"], c["img"], generator=gen)
    y = torch.tensor([(i * 7 + 3) % c["classes"] for i in range(b)])
    loss = F.cross_entropy(forward(P, x_true, c), y)
    target = [t.detach() for t in torch.autograd.grad(loss, [P[n] for n in names])]
    x = torch.rand(b, 3, c["img"], c["img"], generator=gen).requires_grad_(True)
    ts, ts1 = [], []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward(P, x_true, c), y)
        g = torch.autograd.grad(loss, [P[n] for n in names])
        d1 = (time.perf_counter() - t0) * 1e3
        del g
        t0 = time.perf_counter()
        l = ig_loss(P, x, y, target, c, 1e-4)
        (gx,) = torch.autograd.grad(l, [x])
        gx.sum().item()
        d = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            ts.append(d)
            ts1.append(d1)
    print(f"RESULT impl=torch model={'vitb16' if model == 'vitb' else 'small'} batch={b} iters={iters} "
          f"attack_iter_median_ms={statistics.median(ts):.2f} fwd_bwd1_median_ms={statistics.median(ts1):.2f} "
          f"all={[round(t, 1) for t in ts]}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "check":
        torch.set_default_dtype(torch.float64)
        check(sys.argv[2])
    elif cmd == "bench":
        bench(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "small", int(sys.argv[5]) if len(sys.argv) > 5 else 3)
