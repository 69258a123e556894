"""What a GPU machine's torch offers raytp's CUDA path, and the batch-1 ceiling of plain matmuls (no raytp code):

1. torch's version and the signatures of aten's _flash_attention_forward and varlen_attn (is there a paged one?);
2. flash attention over keys padded per sequence to a fixed span with `seqused_k` (what decode graphs run on the
   gathered kernel), eagerly and replayed from a CUDA graph after the lengths changed, against SDPA in float32;
3. the device-to-device copy bandwidth, and the four matmuls per layer plus the LM head of Llama-3-8B at batch 1
   (random bf16 weights, 15 GB), eager and from one CUDA graph, as fractions of bandwidth / weight bytes: what
   a decode step could reach if everything but its weight reads were free.

    python3 benchmarks/gpu_probe.py      # ~30 s on an H200; results/gpu_h200/probe.log
"""
import inspect, json, os, time, torch
res = {"torch": torch.__version__, "cuda": torch.version.cuda}
op = torch.ops.aten._flash_attention_forward
res["aten_flash_schema"] = str(op.default._schema)
try:
    from torch.nn.attention.varlen import varlen_attn
    res["varlen_sig"] = str(inspect.signature(varlen_attn))
except Exception as e:
    res["varlen_sig"] = repr(e)
print(json.dumps(res, indent=1), flush=True)
dev = "cuda"
torch.manual_seed(0)
# FA2 over padded per-sequence keys with seqused_k, eager and in a CUDA graph
B, H, Hkv, D, Kmax = 4, 32, 8, 128, 512
q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(B * Kmax, Hkv, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(B * Kmax, Hkv, D, device=dev, dtype=torch.bfloat16)
cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
cu_k = torch.arange(B + 1, device=dev, dtype=torch.int32) * Kmax
used = torch.tensor([1, 17, 300, 512], device=dev, dtype=torch.int32)
def ref(used_l):
    outs = []
    for b, n in enumerate(used_l):
        kk = k[b*Kmax:b*Kmax+n].repeat_interleave(H // Hkv, 1).transpose(0, 1).float()
        vv = v[b*Kmax:b*Kmax+n].repeat_interleave(H // Hkv, 1).transpose(0, 1).float()
        qq = q[b:b+1].transpose(0, 1).float()
        outs.append(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv).transpose(0, 1))
    return torch.cat(outs)
def fa(nsplit=None):
    kw = dict(scale=D**-0.5, window_size_left=-1, window_size_right=0, seqused_k=used)
    if nsplit is not None: kw["num_splits"] = nsplit
    return op(q, k, v, cu_q, cu_k, 1, Kmax, 0.0, True, False, **kw)[0]
try:
    err = (fa().float() - ref(used.tolist())).abs().max().item(); print("padded seqused eager err", err, flush=True)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fa(); fa()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fa()
    used.copy_(torch.tensor([5, 100, 511, 2], dtype=torch.int32))
    g.replay(); torch.cuda.synchronize()
    print("padded seqused graph err after changing lens", (out.float() - ref([5, 100, 511, 2])).abs().max().item(), flush=True)
except Exception as e:
    print("padded seqused FAILED", repr(e), flush=True)
# weights-only batch-1 matmul stack, Llama-3-8B shapes: eager vs graph, fraction of copy bandwidth
src = torch.empty(2**30, dtype=torch.float16, device=dev); dst = torch.empty_like(src)
for _ in range(3): dst.copy_(src)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): dst.copy_(src)
torch.cuda.synchronize(); bw = 2 * 2**31 * 10 / (time.perf_counter() - t); del src, dst
h, inter, L, vocab = 4096, 14336, 32, 128256
Ws = []
for _ in range(L):
    Ws.append([torch.randn(6144, h, device=dev, dtype=torch.bfloat16) * .02, torch.randn(h, h, device=dev, dtype=torch.bfloat16) * .02,
               torch.randn(2 * inter, h, device=dev, dtype=torch.bfloat16) * .02, torch.randn(h, inter, device=dev, dtype=torch.bfloat16) * .02])
head = torch.randn(vocab, h, device=dev, dtype=torch.bfloat16) * .02
nbytes = sum(w.numel() * 2 for ws in Ws for w in ws) + head.numel() * 2
x0 = torch.randn(1, h, device=dev, dtype=torch.bfloat16)
def stack(x):
    for wq, wo, wgu, wd in Ws:
        a = x @ wq.T
        x = x + a[:, :h] @ wo.T
        gu = x @ wgu.T
        x = x + (gu[:, :inter] * gu[:, inter:]) @ wd.T
    return x @ head.T
for _ in range(3): stack(x0)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): stack(x0)
torch.cuda.synchronize(); eager = (time.perf_counter() - t) / 20
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s): stack(x0)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g): y = stack(x0)
g.replay(); torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): g.replay()
torch.cuda.synchronize(); graph = (time.perf_counter() - t) / 20
print(f"copy bw {bw/1e12:.2f} TB/s; weights {nbytes/1e9:.1f} GB; roofline {nbytes/bw*1e3:.2f} ms; eager {eager*1e3:.2f} ms ({nbytes/bw/eager:.0%}); graph {graph*1e3:.2f} ms ({nbytes/bw/graph:.0%})", flush=True)
