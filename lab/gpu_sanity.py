"""Quick GPU check before a long run: the kernel path equals the reference over three carried calls.

Run: ``python lab/gpu_sanity.py``; exits 1 on a mismatch.
"""
import sys

import torch

from liteattn import LiteAttention

torch.manual_seed(0)
ok = True
for seq, dim in ((8192, 64), (4096, 128)):
    q, k, v = (torch.randn(1, seq, 4, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = k * 2.0  # peakier scores: something to skip
    kern, ref = LiteAttention(-2.0, backend="triton"), LiteAttention(-2.0, backend="torch")
    for call in range(3):
        a = kern(q, k, v)
        b = ref(q.float(), k.float(), v.float())
        err = (a.float() - b).abs().max().item()
        same = torch.equal(kern.state.to_dense(), ref.state.to_dense())
        print(f"seq {seq} dim {dim} call {call}: max abs err {err:.2e}, sparsity {kern.last_sparsity:.3f} / "
              f"{ref.last_sparsity:.3f}, same skip set {same}", flush=True)
        ok = ok and err < 3e-2 and torch.isfinite(a).all().item()
sys.exit(0 if ok else 1)
